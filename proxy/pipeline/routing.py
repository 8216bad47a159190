"""Request-target stage (Host and path, CONTRACT §3 and §7) and the route stage (§2)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.context import CTX
from proxy.core.hosts import BadHost, normalize_host
from proxy.core.paths import BadTarget, split_target
from proxy.core.routes import RouteTable
from proxy.errors import BadRequest, NoRoute
from proxy.settings import RouteSettings


@web.middleware
async def target_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Normalise the Host and resolve the path before anything routes or authenticates."""
    ctx = request[CTX]
    hosts = request.headers.getall("Host", ())
    if len(hosts) != 1:
        # RFC 9112 §3.2: a request with no Host or several Host lines is answered 400.
        raise BadRequest("exactly one Host header is required")
    try:
        ctx.host = normalize_host(hosts[0])
        ctx.path, ctx.query = split_target(request.raw_path, hosts[0])
    except (BadHost, BadTarget) as e:
        raise BadRequest(str(e)) from None
    return await handler(request)


def route_stage(table: RouteTable[RouteSettings]) -> Middleware:
    @web.middleware
    async def route(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = request[CTX]
        ctx.route = table.match(ctx.path)
        if ctx.route is None:
            raise NoRoute()
        return await handler(request)

    return route
