"""Render-quota stage (CONTRACT §13): a POST on a ``meter = "renders"`` route takes a unit of
the tenant's monthly quota before the rate limit and the upstream see it, and keeps it only when
the upstream answered 2xx. It runs before the rate-limit stage, so a refused request spends no
rate-limit token (its answer still carries the rate limit's headers, read without taking one);
a request the rate limit then refuses gives its unit back (not 2xx)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.context import CTX, RequestContext
from proxy.core.bucket import ITEM_FIELDS
from proxy.core.quota import month_id, quota_items, seconds_until_next_month
from proxy.errors import RenderQuotaExceeded
from proxy.stores.base import QuotaStore
from proxy.telemetry import Telemetry


def _is_2xx(status: int | None) -> bool:
    return status is not None and 200 <= status < 300


def quota_stage(
    quotas: QuotaStore,
    clock: Callable[[], datetime],
    telemetry: Telemetry,
    limit_headers: Callable[[RequestContext], Awaitable[None]],
) -> Middleware:
    """``limit_headers`` adds the rate limit's headers to a refusal without taking a token
    (``pipeline.ratelimit.limit_without_a_token``): the answer is keyed like any other."""

    @web.middleware
    async def quota(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = request[CTX]
        route, tenant = ctx.route, ctx.tenant
        assert route is not None and tenant is not None  # earlier stages ran
        if route.meter is None or request.method != "POST":
            return await handler(request)
        now = clock()
        limit = tenant.monthly_render_qty
        reservation = None
        if limit is not None:
            limit = max(0, limit)  # the column allows a negative figure: it admits none
            with telemetry.span("edge.quota"):
                decision = await quotas.reserve(tenant.id, limit, now)
            items = quota_items(limit, decision.left, now)
            ctx.response_headers[ITEM_FIELDS[0]] = items.policy
            ctx.response_headers[ITEM_FIELDS[1]] = items.limit
            if not decision.admitted:
                await limit_headers(ctx)
                retry = str(seconds_until_next_month(now))
                raise RenderQuotaExceeded(headers={"Retry-After": retry})
            reservation = decision.reservation
        try:
            response = await handler(request)
        finally:
            # The upstream's 2xx answer began: the render started, even if the client then
            # left or the body broke off. Anything else gives the unit back.
            ctx.render_started = _is_2xx(ctx.upstream_status)
            quotas.settle(tenant.id, month_id(now), reservation, ctx.render_started)
        return response

    return quota
