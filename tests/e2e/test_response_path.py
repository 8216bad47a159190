"""How answers go back to the client: a small body that came whole with the head is sent as one
write; a streamed one is never held back, whether its first bytes came with the head or not
(server-sent events); and every answer carries the proxy's headers, stamped where it is built."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.http_writer import StreamWriter
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_protocol import RequestHandler

from proxy.access_log import AccessLog
from proxy.app import build_app, build_stores
from proxy.settings import load_settings
from tests.e2e.support import within
from tests.procs import Echo, Proxy, write_config

HOST = "videos.acme.test"


async def test_an_event_sent_with_the_head_arrives_while_the_next_is_held(
    proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    async with asyncio.timeout(10):  # the upstream holds its second event for 30 s
        async with http.get(f"{proxy.url}/public/events?first=1", headers={"Host": HOST}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/event-stream"
            assert await r.content.readuntil(b"\n\n") == b"data: first\n\n"


async def test_a_head_without_body_bytes_is_not_held_for_the_first_event(
    proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    async with asyncio.timeout(10):  # no event for 30 s: the head must not wait for one
        async with http.get(f"{proxy.url}/public/events", headers={"Host": HOST}) as r:
            assert r.status == 200
            assert r.headers["X-Request-Id"]


@pytest.fixture
def server_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The transport writes of server connections in this process, by byte count."""
    writes: list[int] = []
    write, writelines = StreamWriter._write, StreamWriter._writelines

    def spy_write(self: StreamWriter, chunk: Any) -> None:
        if isinstance(self._protocol, RequestHandler):
            writes.append(len(chunk))
        write(self, chunk)

    def spy_writelines(self: StreamWriter, chunks: Any) -> None:
        chunks = list(chunks)
        if isinstance(self._protocol, RequestHandler):
            writes.append(sum(len(c) for c in chunks))
        writelines(self, chunks)

    monkeypatch.setattr(StreamWriter, "_write", spy_write)
    monkeypatch.setattr(StreamWriter, "_writelines", spy_writelines)
    yield writes


@pytest.fixture
async def client(echo: Echo, tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    config = write_config(
        tmp_path / "edge.toml",
        upstreams={"render-api": {"urls": [echo.url]}},
        routes=[{"prefix": "/public", "upstream": "render-api", "auth": "none", "embed": True}],
    )
    settings = load_settings({}, str(config))
    async with TestClient(TestServer(build_app(settings, build_stores(settings)))) as c:
        yield c


async def test_a_small_whole_answer_is_one_write_with_the_proxys_headers(
    client: TestClient[Any, Any], server_writes: list[int]
) -> None:
    r = await client.get("/public/x", headers={"Host": HOST, "Origin": "https://elsewhere.test"})
    body = await r.read()
    assert r.status == 200 and json.loads(body)["path"] == "/public/x"
    assert len(server_writes) == 1 and server_writes[0] > len(body)  # head and body together
    assert r.headers["Content-Length"] == str(len(body))
    assert r.headers["X-Request-Id"] and r.headers["Vary"] == "Origin"
    assert r.headers["Content-Security-Policy"].startswith("frame-ancestors")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("HEAD", "/public/x", 200), ("GET", "/public/status?code=204", 204)],
)
async def test_answers_without_a_body_keep_their_framing(
    client: TestClient[Any, Any], method: str, path: str, status: int
) -> None:
    r = await client.request(method, path, headers={"Host": HOST})
    assert r.status == status and await r.read() == b""
    assert r.headers["X-Request-Id"]


async def test_a_large_answer_is_streamed_whole(
    client: TestClient[Any, Any], server_writes: list[int]
) -> None:
    size = 1 << 20  # past the whole-body threshold: streamed in chunks
    r = await client.get(f"/public/stream?bytes={size}&length=1", headers={"Host": HOST})
    body = await r.read()
    assert r.status == 200 and len(body) == size and r.headers["X-Request-Id"]
    assert len(server_writes) > 1


@pytest.fixture
def logged_bytes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``bytes_sent`` of each access-log line written in this process."""
    sent: list[int] = []
    record = AccessLog.record

    def spy(self: AccessLog, ctx: Any, method: str, status: int, s: float, n: int) -> None:
        sent.append(n)
        record(self, ctx, method, status, s, n)

    monkeypatch.setattr(AccessLog, "record", spy)
    return sent


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/public/stream?bytes=1000&length=1", 1000),  # whole: one web.Response
        ("GET", "/public/stream?bytes=200000&length=1", 200_000),  # streamed, Content-Length
        ("GET", "/public/stream?bytes=200000", 200_000),  # streamed, chunked
        ("HEAD", "/public/stream?bytes=1000&length=1", 0),  # RFC 9110 §9.3.2
        ("HEAD", "/public/x", 0),
        ("GET", "/public/status?code=204", 0),
        ("GET", "/public/status?code=304", 0),
    ],
)
async def test_bytes_sent_counts_the_body_alone_whichever_path_it_takes(
    client: TestClient[Any, Any], logged_bytes: list[int], method: str, path: str, expected: int
) -> None:
    """nginx's $body_bytes_sent: the head (and chunk framing) not counted, so the same answer
    logs the same figure sent whole or streamed."""
    r = await client.request(method, path, headers={"Host": HOST})
    assert len(await r.read()) == (expected if method == "GET" else 0)

    async def logged() -> bool:  # the handler finishes once its last write is done
        return bool(logged_bytes)

    await within(5, logged)
    assert logged_bytes == [expected]
