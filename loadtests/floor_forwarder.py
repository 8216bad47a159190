"""aiohttp's floor: the barest forwarder aiohttp + uvloop can make, the benchmark's reference.

One catch-all handler, one ClientSession, bodies read whole, no access log, no stages. It is
what the proxy would cost with nothing of its own; `loadtests/bench.py` runs it side by side.

    python loadtests/floor_forwarder.py --port 9003 --upstream http://127.0.0.1:9002
"""

import argparse
import sys

import aiohttp
import uvloop
from aiohttp import web

from proxy.cparser import c_parser_in_use

DROP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


def app(upstream: str) -> web.Application:
    async def forward(request: web.Request) -> web.Response:
        async with session.request(
            request.method,
            request.raw_path,
            headers=[(k, v) for k, v in request.headers.items() if k.lower() not in DROP],
            data=await request.read() if request.body_exists else None,
            allow_redirects=False,
        ) as r:
            body = await r.read()
            kept = [(k, v) for k, v in r.headers.items() if k.lower() not in DROP]
            return web.Response(status=r.status, body=body, headers=kept)

    async def session_ctx(_app: web.Application):  # type: ignore[no-untyped-def]
        nonlocal session
        session = aiohttp.ClientSession(upstream, auto_decompress=False)
        yield
        await session.close()

    session: aiohttp.ClientSession
    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", forward)
    application.cleanup_ctx.append(session_ctx)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    if not c_parser_in_use():  # the check `serve` makes: a pure-Python floor would flatter us
        sys.exit("floor_forwarder: aiohttp runs without its C extensions")
    loop = uvloop.new_event_loop()
    web.run_app(app(args.upstream), host="127.0.0.1", port=args.port, access_log=None, loop=loop)


if __name__ == "__main__":
    main()
