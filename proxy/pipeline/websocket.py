"""WebSocket pass-through (CONTRACT §7): one upstream WebSocket per client WebSocket.

The relay works on messages, not bytes: aiohttp terminates the handshake on each side, so the
proxy can still enforce the pipeline (tenant, auth) on the upgrade request. Ping/pong stay
per hop (each side's aiohttp answers its own peer); close codes are carried across.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.context import CTX
from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.pipeline.entry import stamp_response
from proxy.upstreams import UpstreamPool

# Handshake headers each hop generates for itself (RFC 6455 §4.1).
_HANDSHAKE = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Accept",
)


def is_websocket_upgrade(request: web.Request) -> bool:
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    async for msg in source:
        if msg.type is aiohttp.WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type is aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        else:
            break
    await sink.close(code=source.close_code or aiohttp.WSCloseCode.OK)


async def relay_websocket(
    request: web.Request, pool: UpstreamPool, target: str, headers: CIMultiDict[str]
) -> web.StreamResponse:
    for name in _HANDSHAKE:
        headers.popall(name, None)
    protocols = tuple(
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    )
    base = pool.rotation()[0]
    try:
        upstream = await pool.session.ws_connect(
            URL(base + target, encoded=True), headers=headers, protocols=protocols, autoping=True
        )
    except aiohttp.WSServerHandshakeError as e:
        raise UpstreamUnavailable(f"upstream refused the WebSocket upgrade ({e.status})") from None
    except (TimeoutError, aiohttp.ConnectionTimeoutError, aiohttp.SocketTimeoutError):
        raise UpstreamTimeout() from None
    except aiohttp.ClientError:
        raise UpstreamUnavailable() from None
    client = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (), autoping=True
    )
    stamp_response(request, request[CTX], client)
    try:
        await client.prepare(request)
        tasks = [
            asyncio.ensure_future(_pump(client, upstream)),
            asyncio.ensure_future(_pump(upstream, client)),
        ]
        _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await upstream.close()
        await client.close()
    return client
