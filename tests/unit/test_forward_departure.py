"""A client that leaves after the upstream answered but before a whole answer is written gets
no 200 in its audit row: 499 client_closed_request (CONTRACT §7). The departure is made to
land exactly there: between the upstream's head and the relay, the connection is lost as the
event loop would report it. Served through the real connection protocol (proxy.connection)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.app import PIPELINE, build_app, build_stores, runner_kwargs
from proxy.connection import ConnectionGate, EdgeRequestHandler, listen
from proxy.pipeline.forward import Forwarder
from proxy.settings import load_settings
from tests.procs import write_config
from tests.unit.test_audit_stage import HOST, ListSink


async def test_a_client_gone_before_the_whole_answer_is_written_is_recorded_499(
    tmp_path: Path, aiohttp_server: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = web.Application()

    async def small(_request: web.Request) -> web.Response:
        return web.Response(text="small and whole")

    upstream.router.add_get("/{tail:.*}", small)
    up = await aiohttp_server(upstream)
    config = write_config(
        tmp_path / "edge.toml",
        upstreams={"render-api": {"urls": [str(up.make_url("")).rstrip("/")]}},
        routes=[{"prefix": "/", "upstream": "render-api", "auth": "none", "audit": True}],
        sections={"telemetry": {"access_log": False}},
    )
    settings = load_settings({}, str(config))
    sink = ListSink()
    app = build_app(settings, dataclasses.replace(build_stores(settings), audit=sink))
    relay = Forwarder._relay
    left = asyncio.Event()

    async def client_leaves_first(
        self: Forwarder, request: web.Request, *args: Any
    ) -> web.StreamResponse:
        protocol, transport = request.protocol, request.transport
        assert isinstance(protocol, EdgeRequestHandler) and transport is not None
        if not left.is_set():
            left.set()
            transport.abort()  # the client's connection is gone, and the loop says so:
            protocol.connection_lost(None)
        return await relay(self, request, *args)

    monkeypatch.setattr(Forwarder, "_relay", client_leaves_first)
    runner = web.AppRunner(app, **runner_kwargs(settings))  # type: ignore[arg-type]
    await runner.setup()
    gate = ConnectionGate(
        header_timeout_s=10,
        max_connections=10,
        max_headers=100,
        max_line_size=8190,
        max_field_size=8190,
    )
    server = await listen(
        runner, app[PIPELINE].handle, "127.0.0.1", 0, gate, runner_kwargs(settings)
    )
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /x HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        try:
            received = await reader.read()
        except ConnectionResetError:
            received = b""
        writer.close()
        assert received == b""  # the answer was never written
        assert left.is_set()
    finally:
        server.close()
        await runner.cleanup()
    assert [(r.status_code, r.error_message) for r in sink.rows] == [(499, "client_closed_request")]
