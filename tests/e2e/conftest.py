"""One echo upstream and one proxy process per module, configured for the forwarding tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from tests.procs import Echo, Proxy, free_port, start_echo, start_proxy, stop, write_config
from tests.servers import RedisServer

MAX_BODY = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def echo() -> Iterator[Echo]:
    e = start_echo()
    yield e
    stop(e.proc)


@pytest.fixture(scope="module")
def proxy(echo: Echo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    config = write_config(
        tmp_path_factory.mktemp("proxy") / "edge.toml",
        server={"max_body_bytes": MAX_BODY, "trusted_proxies": ["127.0.0.1/32"]},
        upstreams={
            "render-api": {"urls": [echo.url], "read_timeout_s": 5},
            "dead": {"urls": [dead], "connect_timeout_s": 1},
            "slow": {"urls": [echo.url], "read_timeout_s": 1},
            "rr": {"urls": [dead, echo.url]},
        },
        routes=[
            {
                "prefix": "/v1/renders",
                "upstream": "render-api",
                "auth": "api_key",
                "scopes": {"GET": "renders:read", "POST": "renders:create"},
            },
            {"prefix": "/public", "upstream": "render-api", "auth": "none"},
            {"prefix": "/dead", "upstream": "dead", "auth": "none"},
            {"prefix": "/slowup", "upstream": "slow", "auth": "none"},
            {"prefix": "/rr", "upstream": "rr", "auth": "none"},
        ],
    )
    p = start_proxy(config)
    yield p
    stop(p.proc)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own, for tests that stop, pause or reconfigure it."""
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest_asyncio.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the module's database (database-mode modules define ``dsn``)."""
    conn = await asyncpg.connect(dsn)
    yield conn
    await conn.close()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s
