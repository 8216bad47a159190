"""Rate-limit stage (CONTRACT §6): one token per request from the key's bucket, or, for
requests without a key on "none"/"optional" routes, from the client IP's bucket in its tenant
when ``anonymous_rpm`` is set. The headers go on every such answer, errors included."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from proxy.context import RequestContext
from proxy.core.bucket import ITEM_FIELDS, Decision, limit_headers, nothing_allowed
from proxy.core.tenancy import Tenant
from proxy.errors import RateLimited
from proxy.settings import RatelimitSettings, RouteSettings
from proxy.stores.base import BucketStore
from proxy.telemetry import Telemetry


@dataclass(slots=True)
class LimitCounters:
    allowed: int = 0
    rejected: int = 0
    shadow_rejected: int = 0  # would have been rejected, served because of shadow mode


def bucket_of(ctx: RequestContext, anonymous_rpm: int) -> tuple[str, int, str] | None:
    """The bucket, its capacity and its policy name for this request; None: not limited."""
    tenant, route, key = ctx.tenant, ctx.route, ctx.api_key
    assert tenant is not None and route is not None  # earlier stages ran
    if key is not None:
        return f"key:{key.id}", key.rate_limit_rpm, "key"
    if anonymous_rpm and route.auth != "api_key":
        return f"ip:{tenant.id}:{ctx.client_ip}", anonymous_rpm, "ip"
    return None


def _add_headers(ctx: RequestContext, headers: dict[str, str]) -> None:
    """On the context, so they reach error answers and upstream answers alike. The key's items
    come first in the two list fields; the quota stage's items follow (§13)."""
    for name in ITEM_FIELDS:
        later = ctx.response_headers.get(name)
        if later is not None:
            headers[name] = f"{headers[name]}, {later}"
    ctx.response_headers.update(headers)


def limit_without_a_token(
    buckets: BucketStore, settings: RatelimitSettings
) -> Callable[[RequestContext], Awaitable[None]]:
    """For a request refused before the rate limit ran (the render quota, §13): its limit's
    headers as they stand, taking no token. Its own ``Retry-After`` stays the refusal's."""

    async def add(ctx: RequestContext) -> None:
        limit = bucket_of(ctx, settings.anonymous_rpm)
        if limit is None:
            return
        bucket, capacity, policy = limit
        headers = limit_headers(await peek(buckets, bucket, capacity), policy)
        headers.pop("Retry-After", None)
        _add_headers(ctx, headers)

    return add


async def peek(buckets: BucketStore, bucket: str, capacity: int) -> Decision:
    """The bucket's figures as they stand, taking no token (a capacity under one never reaches
    a store: see ``nothing_allowed``)."""
    return await buckets.peek(bucket, capacity) if capacity >= 1 else nothing_allowed(capacity)


def shadowed(settings: RatelimitSettings, tenant: Tenant) -> bool:
    """Decisions are made and reported, never enforced (CONTRACT §6)."""
    return settings.shadow or tenant.features.get("ratelimit_shadow") is True


def ratelimit_stage(
    buckets: BucketStore,
    settings: RatelimitSettings,
    counters: LimitCounters,
    telemetry: Telemetry,
) -> Callable[[web.Request, RequestContext], Awaitable[None]]:
    """The step of a route that ``applies_to`` says may be limited."""
    anonymous_rpm = settings.anonymous_rpm

    async def ratelimit(_request: web.Request, ctx: RequestContext) -> None:
        limit = bucket_of(ctx, anonymous_rpm)
        if limit is None:
            return
        bucket, capacity, policy = limit
        tenant = ctx.tenant
        assert tenant is not None  # the tenant stage ran
        with telemetry.span("edge.ratelimit") as span:
            if capacity >= 1:
                decision = await buckets.take(bucket, capacity)
            else:  # a key row saying 0 rpm: see nothing_allowed
                decision = nothing_allowed(capacity)
            if decision.allowed:
                counters.allowed += 1
                ctx.limit_decision = "allowed"
            elif shadowed(settings, tenant):
                counters.shadow_rejected += 1
                ctx.limit_decision = "shadow"
            else:
                counters.rejected += 1
                ctx.limit_decision = "rejected"
            if span is not None:
                span.set_attribute("flatrender.limiter", ctx.limit_decision)
        _add_headers(ctx, limit_headers(decision, policy))
        if ctx.limit_decision == "rejected":
            raise RateLimited()

    return ratelimit


def applies_to(route: RouteSettings, settings: RatelimitSettings) -> bool:
    """Whether a request on ``route`` can take a token (``bucket_of``): one with a key (a
    route that reads keys), or one without on a route open to anonymous requests when
    ``anonymous_rpm`` is set."""
    return route.auth != "none" or settings.anonymous_rpm > 0
