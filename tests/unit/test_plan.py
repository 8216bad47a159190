"""pipeline.plan: what a route's plan runs, decided once per route. A route with auth "none",
audit off and no rate limit that applies runs the tenant's status check and nothing of auth,
audit, quota or the limiter; the others run their stages in contract order."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from aiohttp import web

from proxy.context import RequestContext
from proxy.pipeline.plan import Planner
from proxy.pipeline.quota import QuotaStage
from proxy.settings import RatelimitSettings, RouteSettings, TelemetrySettings
from proxy.stores.quota import MemoryQuotaStore, no_history
from proxy.telemetry import Telemetry


async def auth(_request: web.Request, _ctx: RequestContext) -> None: ...


async def open_access(_request: web.Request, _ctx: RequestContext) -> None: ...


async def ratelimit(_request: web.Request, _ctx: RequestContext) -> None: ...


QUOTA = QuotaStage(
    MemoryQuotaStore(no_history),
    lambda: datetime.now(UTC),
    Telemetry(TelemetrySettings(access_log=False)),
    lambda _ctx: open_access(None, _ctx),  # type: ignore[arg-type]
)


def planner(audited: bool = True, anonymous_rpm: int = 0) -> Planner:
    return Planner(
        audited=audited,
        auth=auth,
        open_access=open_access,
        quota=QUOTA,
        ratelimit=ratelimit,
        ratelimit_settings=RatelimitSettings(anonymous_rpm=anonymous_rpm),
    )


def test_a_bare_route_runs_only_the_status_check() -> None:
    plan = planner().plan(RouteSettings(prefix="/bare", upstream="u", auth="none"))
    assert plan.steps == (open_access,) and plan.finishers == () and not plan.audited


@pytest.mark.parametrize("mode", ["api_key", "optional"])
def test_a_keyed_route_authenticates_then_limits(mode: str) -> None:
    plan = planner().plan(RouteSettings(prefix="/v1", upstream="u", auth=mode))  # type: ignore[arg-type]
    assert plan.steps == (auth, ratelimit) and not plan.audited


def test_a_metered_audited_route_runs_every_stage_in_contract_order() -> None:
    route = RouteSettings(prefix="/v1/renders", upstream="u", audit=True, meter="renders")
    plan = planner().plan(route)
    assert plan.steps == (auth, QUOTA.step, ratelimit)  # the quota before the limiter (§13)
    assert plan.finishers == (("quota", QUOTA.finish),) and plan.audited


def test_anonymous_limits_put_the_limiter_on_open_routes() -> None:
    plan = planner(anonymous_rpm=60).plan(RouteSettings(prefix="/p", upstream="u", auth="none"))
    assert plan.steps == (open_access, ratelimit)


def test_no_audit_sink_means_no_audit_whatever_the_route_says() -> None:
    route = RouteSettings(prefix="/v1", upstream="u", audit=True)
    assert not planner(audited=False).plan(route).audited
