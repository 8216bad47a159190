"""The lean upstream transport experiment (loadtests/lean_transport.py) against an in-process
loopback upstream: the request head as given, the answer parsed whole by aiohttp's C parser,
kept-alive connections reused, and a connection the upstream closes never reused."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

LOADTESTS = Path(__file__).resolve().parent.parent.parent / "loadtests"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "loadtests_lean_transport", LOADTESTS / "lean_transport.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lean = _load()


async def _upstream(aiohttp_server: Callable[..., Any]) -> tuple[str, list[tuple[Any, ...]]]:
    seen: list[tuple[Any, ...]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peer = request.transport.get_extra_info("peername")
        seen.append((request.method, request.raw_path, request.headers.get("X-Probe"), peer))
        if request.path.endswith("/close"):
            return web.Response(text="bye", headers={"Connection": "close"})
        if request.path.endswith("/chunked"):
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b"a" * 100)
            await response.write(b"b" * 100)
            await response.write_eof()
            return response
        return web.Response(text="hello", headers={"X-Up": "1"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}", seen


async def test_get_sends_the_head_and_reads_the_whole_answer(
    aiohttp_server: Callable[..., Any],
) -> None:
    base, seen = await _upstream(aiohttp_server)
    transport = lean.LeanTransport()
    try:
        message, body = await transport.get(base, "/a/b?q=1", CIMultiDict({"X-Probe": "p"}))
        assert (message.code, message.headers["X-Up"], body) == (200, "1", b"hello")
        message, body = await transport.get(base, "/a/chunked", CIMultiDict())
        assert (message.code, body) == (200, b"a" * 100 + b"b" * 100)
    finally:
        transport.close()
    assert [s[:3] for s in seen] == [("GET", "/a/b?q=1", "p"), ("GET", "/a/chunked", None)]


async def test_a_kept_alive_connection_is_reused(aiohttp_server: Callable[..., Any]) -> None:
    base, seen = await _upstream(aiohttp_server)
    transport = lean.LeanTransport()
    try:
        for _ in range(3):
            await transport.get(base, "/x", CIMultiDict())
    finally:
        transport.close()
    assert len({s[3] for s in seen}) == 1  # one client port: one connection


async def test_a_connection_the_upstream_closes_is_not_reused(
    aiohttp_server: Callable[..., Any],
) -> None:
    base, seen = await _upstream(aiohttp_server)
    transport = lean.LeanTransport()
    try:
        _, body = await transport.get(base, "/close", CIMultiDict())
        assert body == b"bye"
        await transport.get(base, "/x", CIMultiDict())
    finally:
        transport.close()
    assert seen[0][3] != seen[1][3]  # a new connection for the second request
