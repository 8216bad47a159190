"""Logging must never stall the event loop (proxy.logs)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.procs import Echo, start_proxy, stop, write_config


async def test_an_undrained_log_pipe_does_not_stall_requests(echo: Echo, tmp_path: Path) -> None:
    # start_proxy gives the proxy a stdout/stderr pipe that nobody reads until it stops: a
    # synchronous log handler would block once ~64 KiB of lines filled it. Each request here
    # logs a warning (the upstream dies mid-body), about 96 KB in all.
    config = write_config(
        tmp_path / "edge.toml",
        upstreams={"up": {"urls": [echo.url]}},
        routes=[{"prefix": "/public", "upstream": "up", "auth": "none"}],
    )
    proxy = start_proxy(config, pipe=True)
    try:
        sem = asyncio.Semaphore(32)
        async with aiohttp.ClientSession() as http:

            async def one() -> bool:
                async with sem:
                    try:
                        async with http.get(
                            f"{proxy.url}/public/truncate?chunked=1",
                            headers={"Host": "flatrender.test"},
                        ) as r:
                            await r.read()
                    except aiohttp.ClientPayloadError:
                        return True  # the cut the proxy must make
                    return False

            cut = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(800))), 60)
        assert all(cut)
    finally:
        stop(proxy.proc)
