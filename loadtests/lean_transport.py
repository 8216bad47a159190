"""Experiment: a lean upstream transport behind the proxy's ``Forwarder``, instead of aiohttp's
``ClientSession`` (measured by loadtests/lean_bench.py; the result is in the README's
performance section, and why it is not adopted).

Kept-alive connections per upstream on plain asyncio protocols; the request head goes out in
one write; the answer is parsed by aiohttp's C ``HttpResponseParser`` (llhttp), the parser
``ClientSession`` uses too, so only the client machinery around it is left out. It covers the
plain path only: a GET without a body and without an upgrade, to the pool's first URL,
answered whole. Everything else goes to the product's ``Forwarder`` unchanged.

Run the proxy with it (same arguments as ``python -m proxy``):

    python loadtests/lean_transport.py serve --config edge.toml --listen 127.0.0.1:8080
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from aiohttp._http_parser import HttpResponseParser
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDict
from opentelemetry.trace import Span
from yarl import URL

from proxy.connection import EdgeRequestHandler
from proxy.context import RequestContext
from proxy.core.forwarding import response_headers_to_return
from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.pipeline import forward
from proxy.pipeline.entry import stamp_response
from proxy.pipeline.websocket import is_websocket_upgrade
from proxy.upstreams import UpstreamPool

READ_LIMIT = 2**16


class LeanConnection(BaseProtocol):
    """One kept-alive upstream connection; one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._parser = HttpResponseParser(self, loop, READ_LIMIT, response_with_body=True)
        self._answer: asyncio.Future[tuple[Any, Any]] | None = None
        self.closed = False

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.closed = True
        error = exc or ConnectionResetError("upstream closed the connection")
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(error)
        self._parser.feed_eof()

    def data_received(self, data: bytes) -> None:
        messages, _upgraded, _tail = self._parser.feed_data(data)
        for message, payload in messages:
            if self._answer is not None and not self._answer.done():
                self._answer.set_result((message, payload))

    async def exchange(self, head: bytes) -> tuple[Any, bytes]:
        """Sends ``head`` in one write; the answer's head and whole body."""
        assert self.transport is not None
        self._answer = self._loop.create_future()
        self.transport.write(head)
        message, payload = await self._answer
        self._answer = None
        body = await payload.read()
        return message, body


class LeanTransport:
    """Idle kept-alive connections per upstream (host, port)."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[LeanConnection]] = {}

    async def get(self, base: str, target: str, headers: CIMultiDict[str]) -> tuple[Any, bytes]:
        url = URL(base)
        key = (url.host or "", url.port or 80)
        idle = self._idle.setdefault(key, [])
        conn = idle.pop() if idle else None
        while conn is not None and conn.closed:
            conn = idle.pop() if idle else None
        if conn is None:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(lambda: LeanConnection(loop), *key)
        lines = [f"GET {target} HTTP/1.1\r\n"]
        if "Host" not in headers:
            lines.append(f"Host: {url.raw_authority}\r\n")
        lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
        lines.append("\r\n")
        try:
            message, body = await conn.exchange("".join(lines).encode("latin-1"))
        except BaseException:
            if conn.transport is not None:
                conn.transport.close()
            raise
        if message.should_close or conn.closed:
            if conn.transport is not None:
                conn.transport.close()
        else:
            idle.append(conn)
        return message, body

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()


class LeanForwarder(forward.Forwarder):
    """The product's Forwarder with the plain path (GET, no body, no upgrade) on
    ``LeanTransport``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lean = LeanTransport()

    async def _forward(
        self,
        request: web.Request,
        ctx: RequestContext,
        pool: UpstreamPool,
        target: str,
        headers: CIMultiDict[str],
        span: Span | None,
        edge: EdgeRequestHandler | None,
    ) -> web.StreamResponse:
        if request.method != "GET" or request.body_exists or is_websocket_upgrade(request):
            return await super()._forward(request, ctx, pool, target, headers, span, edge)
        await pool.admit()
        try:
            try:
                async with asyncio.timeout(pool.settings.read_timeout_s):
                    message, body = await self._lean.get(pool.rotation()[0], target, headers)
            except TimeoutError:
                raise UpstreamTimeout() from None
            except OSError:
                raise UpstreamUnavailable() from None
            ctx.upstream_status = message.code
            response = web.Response(status=message.code, reason=message.reason, body=body)
            for name, value in response_headers_to_return(list(message.headers.items())):
                response.headers.add(name, value)
            stamp_response(request, ctx, response)
            return response
        finally:
            pool.leave()


def main(argv: Sequence[str] | None = None) -> int:
    import proxy.app
    from proxy.__main__ import main as proxy_main

    proxy.app.Forwarder = LeanForwarder  # type: ignore[misc]
    return proxy_main(argv)


if __name__ == "__main__":
    sys.exit(main())
