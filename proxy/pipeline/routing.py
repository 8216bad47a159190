"""Request-target stage (Host and path, CONTRACT §3 and §7), the domain-verification challenge
(§3), and the route stage (§2, with the embed policy of §4). Steps of the plan
(``pipeline.plan``): each reads and fills the request's context, and raises to refuse."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime

from aiohttp import web

from proxy.context import RequestContext
from proxy.core.cors import frame_ancestors
from proxy.core.framing import framing_problem
from proxy.core.hosts import BadHost, is_platform_name, normalize_host
from proxy.core.paths import BadTarget, split_target
from proxy.errors import BadRequest, ChallengeNotFound, NoRoute
from proxy.settings import RouteSettings
from proxy.stores.base import ChallengeStore
from proxy.upstreams import UpstreamPool


def target_stage(request: web.Request, ctx: RequestContext) -> None:
    """Normalise the Host and resolve the path before anything routes or authenticates."""
    if request.method == "CONNECT":
        # RFC 9110 §9.3.6: a tunnel request, whose target is an authority, never a path; this
        # is not a tunnel.
        raise BadRequest("CONNECT is not served")
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


def route_stage(
    ctx: RequestContext, route: RouteSettings | None, pools: Mapping[str, UpstreamPool]
) -> None:
    """The route the plan matched for ``ctx.path``, with the pools of the configuration it
    came from (one snapshot: SIGHUP-safe); an embed route's framing policy."""
    if route is None:
        raise NoRoute()
    ctx.route, ctx.pools = route, pools
    if route.embed:
        branding = ctx.tenant.branding if ctx.tenant else None
        ctx.response_headers["Content-Security-Policy"] = (
            frame_ancestors(branding.embed_enabled, branding.embed_allowed_hosts)
            if branding
            else frame_ancestors(False, ())
        )


CHALLENGE_PREFIX = "/.well-known/flatrender-challenge/"


def is_challenge(request: web.Request, ctx: RequestContext) -> bool:
    return challenge_target(request.method, ctx.path)


def challenge_target(method: str, path: str) -> bool:
    return path.startswith(CHALLENGE_PREFIX) and method in ("GET", "HEAD")


async def challenge_token(
    store: ChallengeStore, platform_domains: tuple[str, ...], host: str, path: str, now: datetime
) -> str | None:
    """The token a challenge request is answered with, or None (404): never for a platform
    name (CONTRACT §3), where a tenant must not prove control of a host that is not its."""
    token = path[len(CHALLENGE_PREFIX) :]
    if (
        not token
        or "/" in token
        or is_platform_name(host, platform_domains)
        or not await store.challenge_valid(host, token, now)
    ):
        return None
    return token


def challenge_stage(
    store: ChallengeStore, platform_domains: tuple[str, ...], clock: Callable[[], datetime]
) -> Callable[[RequestContext], Awaitable[web.Response]]:
    """Answer custom-domain verification before tenant resolution: it must work while the
    domain is still unverified (which the tenant stage would refuse with 421). Runs for the
    requests ``is_challenge`` picks."""

    async def challenge(ctx: RequestContext) -> web.Response:
        token = await challenge_token(store, platform_domains, ctx.host, ctx.path, clock())
        if token is None:
            raise ChallengeNotFound()
        return web.Response(text=token, content_type="text/plain")

    return challenge
