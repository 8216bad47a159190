"""The in-process render-quota store (no REDIS_URL): reservations, settlement, the month's
count rebuilt once, and a new month starting from nothing."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime

import pytest

from proxy.audit.record import AuditRecord
from proxy.core.quota import month_id
from proxy.errors import TenantStoreUnavailable
from proxy.stores.quota import MemoryQuotaStore

TENANT = "eeeeeeee-0000-0000-0000-000000000002"
NOW = datetime(2026, 12, 31, 23, 0, tzinfo=UTC)


class History:
    def __init__(self, renders: int) -> None:
        self.renders = renders
        self.asked: list[date] = []
        self.gate = asyncio.Event()

    async def __call__(self, _tenant_id: str, month: date) -> int:
        self.asked.append(month)
        await self.gate.wait()
        return self.renders


async def test_reserve_keep_and_give_back() -> None:
    history = History(1)
    history.gate.set()
    quotas = MemoryQuotaStore(history)
    month = month_id(NOW)
    first = await quotas.reserve(TENANT, 3, NOW)
    second = await quotas.reserve(TENANT, 3, NOW)
    assert (first.admitted, first.left, second.admitted, second.left) == (True, 1, True, 0)
    assert not (await quotas.reserve(TENANT, 3, NOW)).admitted  # both still in flight
    quotas.settle(TENANT, month, first.reservation, False)  # given back
    third = await quotas.reserve(TENANT, 3, NOW)
    assert third.admitted
    quotas.settle(TENANT, month, second.reservation, True)
    quotas.settle(TENANT, month, third.reservation, True)
    refused = await quotas.reserve(TENANT, 3, NOW)
    assert (refused.admitted, refused.left) == (False, 0)
    assert (await quotas.reserve(TENANT, 4, NOW)).admitted  # a raised quota admits again
    assert (quotas.counters.kept, quotas.counters.given_back) == (2, 1)


async def test_the_months_count_is_rebuilt_once_for_concurrent_requests() -> None:
    history = History(5)
    quotas = MemoryQuotaStore(history)
    waiting = [asyncio.ensure_future(quotas.reserve(TENANT, 7, NOW)) for _ in range(4)]
    await asyncio.sleep(0)
    history.gate.set()
    decisions = await asyncio.gather(*waiting)
    assert [d.admitted for d in decisions] == [True, True, False, False]
    assert history.asked == [date(2026, 12, 1)]


async def test_a_new_month_starts_from_nothing() -> None:
    history = History(0)
    history.gate.set()
    quotas = MemoryQuotaStore(history)
    december = await quotas.reserve(TENANT, 1, NOW)
    quotas.settle(TENANT, month_id(NOW), december.reservation, True)
    assert not (await quotas.reserve(TENANT, 1, NOW)).admitted
    january = datetime(2027, 1, 1, tzinfo=UTC)
    assert (await quotas.reserve(TENANT, 1, january)).admitted
    assert history.asked == [date(2026, 12, 1), date(2027, 1, 1)]


class GatedMonths:
    """No renders in any month; each month's answer waits for that month's gate."""

    def __init__(self) -> None:
        self.gates: dict[date, asyncio.Event] = {}

    async def __call__(self, _tenant_id: str, month: date) -> int:
        await self.gates.setdefault(month, asyncio.Event()).wait()
        return 0


async def test_a_rebuild_answered_after_the_month_turned_keeps_the_new_months_state() -> None:
    """A December request's rebuild answers once January has begun: January's count stays."""
    history = GatedMonths()
    quotas = MemoryQuotaStore(history)
    january = datetime(2027, 1, 1, tzinfo=UTC)
    late = asyncio.ensure_future(quotas.reserve(TENANT, 5, NOW))
    await asyncio.sleep(0)  # it waits for December's count
    history.gates.setdefault(date(2027, 1, 1), asyncio.Event()).set()
    kept = await quotas.reserve(TENANT, 1, january)
    quotas.settle(TENANT, month_id(january), kept.reservation, True)
    history.gates[date(2026, 12, 1)].set()
    assert (await late).admitted  # decided on December's count, stored nowhere
    assert not (await quotas.reserve(TENANT, 1, january)).admitted  # January's 1 kept


def test_audit_rows_carry_the_render_mark_through_the_spool_format() -> None:
    row = AuditRecord(
        created_at=NOW,
        tenant_id=TENANT,
        api_key_id=None,
        method="POST",
        path="/v1/renders",
        status_code=201,
        duration_ms=3,
        request_id="9b2f0000-0000-4000-8000-000000000001",
        ip_address="203.0.113.7",
        user_agent=None,
        error_message=None,
        render_started=True,
    )
    assert AuditRecord.from_json_row(row.as_json_row()) == row
    older = row.as_json_row()
    del older["render_started"]  # a spool file written before the mark existed
    assert AuditRecord.from_json_row(older).render_started is False


async def test_peek_says_what_reserve_would_and_changes_nothing() -> None:
    """``/explain``'s quota peek: the decision and the units left before this request, from
    the month's count (read from the history when this process has none) and the units in
    flight; nothing is reserved, stored or counted."""
    history = History(2)
    history.gate.set()
    quotas = MemoryQuotaStore(history)
    cold = await quotas.peek(TENANT, 3, NOW)
    assert (cold.admitted, cold.left, cold.reservation) == (True, 1, None)
    assert quotas.counters.rebuilds == 0 and len(history.asked) == 1
    assert (await quotas.peek(TENANT, 3, NOW)).left == 1  # still nothing reserved
    held = await quotas.reserve(TENANT, 3, NOW)  # the last unit, in flight
    assert held.admitted
    before = (quotas.counters.admitted, quotas.counters.refused)
    full = await quotas.peek(TENANT, 3, NOW)
    assert (full.admitted, full.left) == (False, 0)
    assert not (await quotas.reserve(TENANT, 3, NOW)).admitted  # reserve agrees
    quotas.settle(TENANT, month_id(NOW), held.reservation, False)
    assert (await quotas.peek(TENANT, 3, NOW)).admitted  # given back: room again
    assert (quotas.counters.admitted, quotas.counters.refused) == (before[0], before[1] + 1)
    assert (await quotas.peek(TENANT, 0, NOW)).admitted is False  # 0 admits none


async def test_postgres_unavailable_for_a_missing_count_is_a_503_and_no_rebuild() -> None:
    async def unavailable(_tenant_id: str, _month: date) -> int:
        raise TenantStoreUnavailable()

    quotas = MemoryQuotaStore(unavailable)
    with pytest.raises(TenantStoreUnavailable) as raised:
        await quotas.reserve(TENANT, 3, NOW)
    assert raised.value.headers == {"Retry-After": "1"}
    assert quotas.counters.rebuilds == 0
