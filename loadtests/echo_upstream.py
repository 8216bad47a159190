"""A small render-service stand-in: echoes what it received, plus endpoints for tests and demos.

One implementation serves ``make run``'s demo upstream, the e2e tests' stub and the benchmark's
fast upstream. Run: ``python loadtests/echo_upstream.py --port 9001``.

Endpoints (any prefix; matched on the last path segment):
- ``.../stream?bytes=N``   streams N bytes in 64 KiB chunks (chunked, or ``&length=1`` for CL)
- ``.../slow?seconds=S``   answers after S seconds
- ``.../hold?seconds=S``   answers after S seconds unless the connection is closed first, which
                            ``/__closed/<request-id>`` then reports
- ``.../reset``            aborts the connection without answering
- ``.../truncate``         promises 1 MiB (Content-Length, or chunked with ``?chunked=1``),
                            sends 64 KiB, then aborts
- ``.../hop``              answers with hop-by-hop and Connection-named headers
- ``.../events?first=1``   server-sent events: the head (and with ``first=1`` one event) at
                            once, the next event only after ``gap`` seconds (default 30)
- ``.../ws``               WebSocket echo
- ``/__count/<request-id>`` how many requests with that X-Request-Id arrived
- ``/__closed/<request-id>`` whether a ``hold`` request with that X-Request-Id saw its
                            connection closed before it answered
- anything else             JSON: method, path, query, headers (list of pairs), body size/sha256
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
from collections import Counter

from aiohttp import WSMsgType, web

CHUNK = b"x" * 65536
SEEN = web.AppKey("seen", Counter[str])
CLOSED = web.AppKey("closed", set[str])


async def _echo(request: web.Request) -> web.StreamResponse:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path.partition("?")[0],
            "query": request.raw_path.partition("?")[2],
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
            "peer": request.remote,
        }
    )


async def _stream(request: web.Request) -> web.StreamResponse:
    total = int(request.query.get("bytes", "0"))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("length"):
        response.content_length = total
    await response.prepare(request)
    left = total
    while left > 0:
        n = min(left, len(CHUNK))
        await response.write(CHUNK[:n])
        left -= n
    await response.write_eof()
    return response


async def _hold(request: web.Request, rid: str | None) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    end = loop.time() + float(request.query.get("seconds", "5"))
    while loop.time() < end:
        transport = request.transport
        if transport is None or transport.is_closing():
            if rid:
                request.app[CLOSED].add(rid)
            return web.Response()
        await asyncio.sleep(0.01)  # a stub's poll; aiohttp does not cancel handlers on close
    return await _echo(request)


async def _events(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if request.query.get("first") == "1":
        await response.write(b"data: first\n\n")
    loop = asyncio.get_running_loop()
    end = loop.time() + float(request.query.get("gap", "30"))
    while loop.time() < end:
        transport = request.transport
        if transport is None or transport.is_closing():
            return response  # the reader left: stop holding
        await asyncio.sleep(0.01)
    await response.write(b"data: later\n\n")
    await response.write_eof()
    return response


async def _ws(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(protocols=("render.v1",))
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(f"echo:{msg.data}")
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def handle(request: web.Request) -> web.StreamResponse:
    rid = request.headers.get("X-Request-Id")
    path = request.path
    if path.startswith("/__count/"):
        return web.json_response({"count": request.app[SEEN][path.rsplit("/", 1)[1]]})
    if path.startswith("/__closed/"):
        return web.json_response({"closed": path.rsplit("/", 1)[1] in request.app[CLOSED]})
    if rid:
        request.app[SEEN][rid] += 1
    last = path.rsplit("/", 1)[-1]
    if last == "stream":
        return await _stream(request)
    if last == "status":  # an answer with the status asked for: /status?code=500
        await request.read()
        return web.json_response({"status": "as asked"}, status=int(request.query["code"]))
    if last == "slow":
        await asyncio.sleep(float(request.query.get("seconds", "5")))
        return await _echo(request)
    if last == "hold":
        return await _hold(request, rid)
    if last == "reset":
        assert request.transport is not None
        request.transport.abort()
        return web.Response()
    if last == "truncate":
        response = web.StreamResponse()
        if not request.query.get("chunked"):
            response.content_length = 1 << 20
        await response.prepare(request)
        await response.write(CHUNK)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response
    if last == "hop":
        return web.Response(
            text="hop",
            headers={
                "Connection": "X-Internal-Token, close",
                "X-Internal-Token": "secret",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic",
                "Trailer": "X-Checksum",
                "X-FlatRender-Internal": "leak",
                "Vary": "Accept-Encoding",
                "Access-Control-Allow-Origin": "*",
                "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE",
                "X-Kept": "yes",
            },
        )
    if last == "ws":
        return await _ws(request)
    if last == "events":
        return await _events(request)
    return await _echo(request)


def make_app() -> web.Application:
    app = web.Application()
    app[SEEN] = Counter()
    app[CLOSED] = set()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args()
    print(json.dumps({"echo_upstream": f"http://{args.host}:{args.port}"}), flush=True)
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
