"""Request-target stage (Host and path, CONTRACT §3 and §7), the domain-verification challenge
(§3), and the route stage (§2, with the embed policy of §4)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.context import CTX
from proxy.core.cors import frame_ancestors
from proxy.core.framing import framing_problem
from proxy.core.hosts import BadHost, is_platform_name, normalize_host
from proxy.core.paths import BadTarget, split_target
from proxy.errors import BadRequest, ChallengeNotFound, NoRoute
from proxy.stores.base import ChallengeStore
from proxy.upstreams import Routing


@web.middleware
async def target_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Normalise the Host and resolve the path before anything routes or authenticates."""
    ctx = request[CTX]
    # Framing first (RFC 9112 §6): what llhttp accepts but the proxy cannot forward faithfully.
    problem = framing_problem(request.version, request.headers.getall("Transfer-Encoding", ()))
    if problem is not None:
        raise BadRequest(problem)
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


def route_stage(routing: Routing) -> Middleware:
    @web.middleware
    async def route(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = request[CTX]
        snapshot = routing.current  # route and pools from one configuration (SIGHUP-safe)
        ctx.route, ctx.pools = snapshot.table.match(ctx.path), snapshot.pools
        if ctx.route is None:
            raise NoRoute()
        if ctx.route.embed:
            branding = ctx.tenant.branding if ctx.tenant else None
            ctx.response_headers["Content-Security-Policy"] = (
                frame_ancestors(branding.embed_enabled, branding.embed_allowed_hosts)
                if branding
                else frame_ancestors(False, ())
            )
        return await handler(request)

    return route


CHALLENGE_PREFIX = "/.well-known/flatrender-challenge/"


def challenge_stage(
    store: ChallengeStore, platform_domains: tuple[str, ...], clock: Callable[[], datetime]
) -> Middleware:
    """Answer custom-domain verification before tenant resolution: it must work while the
    domain is still unverified (which the tenant stage would refuse with 421). Never for a
    platform name (CONTRACT §3): a tenant must not prove control of a host that is not its."""

    @web.middleware
    async def challenge(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = request[CTX]
        if not ctx.path.startswith(CHALLENGE_PREFIX) or request.method not in ("GET", "HEAD"):
            return await handler(request)
        token = ctx.path[len(CHALLENGE_PREFIX) :]
        if (
            not token
            or "/" in token
            or is_platform_name(ctx.host, platform_domains)
            or not await store.challenge_valid(ctx.host, token, clock())
        ):
            raise ChallengeNotFound()
        return web.Response(text=token, content_type="text/plain")

    return challenge
