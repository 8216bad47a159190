"""pipeline.quota: the month a metered POST counts in is the audit row's (one clock reading
per request), so the quota and renders_started agree at a month's boundary."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp.test_utils import make_mocked_request

from proxy.context import RequestContext
from proxy.core.tenancy import Tenant
from proxy.pipeline.quota import QuotaStage
from proxy.settings import TelemetrySettings
from proxy.stores.quota import MemoryQuotaStore, no_history
from proxy.telemetry import Telemetry

LAST_INSTANT = datetime(2026, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)
NEXT_MONTH = datetime(2027, 1, 1, tzinfo=UTC)


async def _no_headers(_ctx: RequestContext) -> None: ...


def stage(quotas: MemoryQuotaStore) -> QuotaStage:
    return QuotaStage(
        quotas, lambda: NEXT_MONTH, Telemetry(TelemetrySettings(access_log=False)), _no_headers
    )


async def test_a_render_at_the_boundary_counts_in_the_audit_rows_month() -> None:
    quotas = MemoryQuotaStore(no_history)
    ctx = RequestContext(request_id="r", started=0.0, audited_at=LAST_INSTANT)
    ctx.tenant = Tenant(id="t", slug="t", status="Active", monthly_render_qty=5)
    await stage(quotas).step(make_mocked_request("POST", "/v1/renders"), ctx)
    assert ctx.quota_held is not None and ctx.quota_held[1] == "2026-12"
    assert ctx.response_headers["RateLimit"].endswith(";t=1")  # December's last second


async def test_without_an_audit_row_the_stage_reads_the_clock() -> None:
    ctx = RequestContext(request_id="r", started=0.0)
    ctx.tenant = Tenant(id="t", slug="t", status="Active", monthly_render_qty=5)
    await stage(MemoryQuotaStore(no_history)).step(make_mocked_request("POST", "/"), ctx)
    assert ctx.quota_held is not None and ctx.quota_held[1] == "2027-01"
