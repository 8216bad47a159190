"""CORS stage (CONTRACT §4): preflights answered here, before authentication and without any
upstream; for other requests, the headers an allowed origin gets on every answer."""

from __future__ import annotations

from aiohttp import web

from proxy.context import RequestContext
from proxy.core.cors import actual_headers, preflight_headers
from proxy.errors import BadRequest, OriginNotAllowed


def cors_stage(request: web.Request, ctx: RequestContext) -> web.Response | None:
    """The preflight's answer, or None for a request that goes on."""
    assert ctx.tenant is not None  # the tenant stage ran
    origin = request.headers.get("Origin")
    # Whatever the origin (or its absence), the answer depends on it: caches must key on it.
    ctx.response_headers["Vary"] = "Origin"
    requested = request.headers.get("Access-Control-Request-Method")
    if request.method == "OPTIONS" and origin is not None and requested is not None:
        if not ctx.tenant.cors.allows(origin):
            raise OriginNotAllowed()
        headers = preflight_headers(
            origin, requested, request.headers.get("Access-Control-Request-Headers")
        )
        if headers is None:
            raise BadRequest("malformed CORS preflight")
        ctx.response_headers.update(headers)
        return web.Response(status=204)
    if origin is not None and ctx.tenant.cors.allows(origin):
        ctx.response_headers.update(actual_headers(origin))
    return None
