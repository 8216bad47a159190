"""Render-quota stage (CONTRACT §13): a POST on a ``meter = "renders"`` route takes a unit of
the tenant's monthly quota before the rate limit and the upstream see it, and keeps it only when
the upstream answered 2xx. It runs before the rate-limit stage, so a refused request spends no
rate-limit token (its answer still carries the rate limit's headers, read without taking one);
a request the rate limit then refuses gives its unit back (not 2xx)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from aiohttp import web

from proxy.context import RequestContext
from proxy.core.bucket import ITEM_FIELDS
from proxy.core.quota import (
    applicable_quota,
    month_id,
    quota_items,
    seconds_until_next_month,
)
from proxy.errors import RenderQuotaExceeded
from proxy.stores.base import QuotaStore
from proxy.telemetry import Telemetry


def _is_2xx(status: int | None) -> bool:
    return status is not None and 200 <= status < 300


class QuotaStage:
    """The step of a ``meter = "renders"`` route, and its ``finish`` once the answer is known
    (the plan's one ``finally``), which keeps or gives back the unit the step took.
    ``limit_headers`` adds the rate limit's headers to a refusal without taking a token
    (``pipeline.ratelimit.limit_without_a_token``): the answer is keyed like any other."""

    __slots__ = ("_clock", "_limit_headers", "_quotas", "_telemetry")

    def __init__(
        self,
        quotas: QuotaStore,
        clock: Callable[[], datetime],
        telemetry: Telemetry,
        limit_headers: Callable[[RequestContext], Awaitable[None]],
    ) -> None:
        self._quotas = quotas
        self._clock = clock
        self._telemetry = telemetry
        self._limit_headers = limit_headers

    async def step(self, request: web.Request, ctx: RequestContext) -> None:
        tenant = ctx.tenant
        assert tenant is not None  # earlier stages ran
        if request.method != "POST":
            return
        # The audit row's clock reading when there is one: a render at a month's boundary is
        # counted in the same month in the quota and in the row's renders_started.
        now = ctx.audited_at or self._clock()
        limit = applicable_quota(request.method, tenant.monthly_render_qty)
        reservation = None
        if limit is not None:
            with self._telemetry.span("edge.quota"):
                decision = await self._quotas.reserve(tenant.id, limit, now)
            items = quota_items(limit, decision.left, now)
            ctx.response_headers[ITEM_FIELDS[0]] = items.policy
            ctx.response_headers[ITEM_FIELDS[1]] = items.limit
            if not decision.admitted:
                await self._limit_headers(ctx)
                retry = str(seconds_until_next_month(now))
                raise RenderQuotaExceeded(headers={"Retry-After": retry})
            reservation = decision.reservation
        ctx.quota_held = (tenant.id, month_id(now), reservation)

    def finish(self, ctx: RequestContext) -> None:
        if ctx.quota_held is None:
            return  # not a metered POST, or refused before a unit was taken
        tenant_id, month, reservation = ctx.quota_held
        # The upstream's 2xx answer began: the render started, even if the client then left
        # or the body broke off. Anything else gives the unit back.
        ctx.render_started = _is_2xx(ctx.upstream_status)
        self._quotas.settle(tenant_id, month, reservation, ctx.render_started)
