"""proxy.stores.miss_budget.BudgetedLoads: only misses spend the budget; a lookup beyond it waits
for a token up to the store timeout, then is refused 503 with Retry-After: 1."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.errors import TenantStoreUnavailable
from proxy.stores.cached import LoadingCache
from proxy.stores.miss_budget import BudgetedLoads


class Store:
    """Knows ``known``; each call waits for its own gate when ``gated``."""

    def __init__(self, known: set[str], *, gated: bool = False) -> None:
        self.known = known
        self.gated = gated
        self.calls: list[str] = []
        self.gates: list[asyncio.Event] = []
        self.called = asyncio.Event()

    async def load(self, name: str) -> str | None:
        self.calls.append(name)
        self.called.set()
        if self.gated:
            gate = asyncio.Event()
            self.gates.append(gate)
            await gate.wait()
        return name.upper() if name in self.known else None


async def test_existing_names_never_spend_the_budget() -> None:
    store = Store({"acme"})
    loads = BudgetedLoads(per_s=2, timeout_s=0.05)
    budgeted = loads.wrap(store.load)
    for _ in range(100):
        assert await budgeted("acme") == "ACME"
    assert loads.refusals == 0


async def test_misses_spend_it_and_the_next_lookup_is_refused_with_retry_after() -> None:
    store = Store({"acme"})
    loads = BudgetedLoads(per_s=2, timeout_s=0.05)
    budgeted = loads.wrap(store.load)
    assert await budgeted("x1") is None
    assert await budgeted("x2") is None
    with pytest.raises(TenantStoreUnavailable) as refused:
        await budgeted("acme")  # nothing left: even a name that exists waits, then is refused
    assert refused.value.status == 503
    assert refused.value.headers == {"Retry-After": "1"}
    assert store.calls == ["x1", "x2"]  # the refused lookup never reached the store
    assert loads.refusals == 1


async def test_a_waiting_lookup_takes_the_token_a_hit_gives_back() -> None:
    """A cold burst of existing names larger than the budget: the ones beyond it wait for
    tokens given back and are all answered."""
    store = Store({f"t{i}" for i in range(10)}, gated=True)
    loads = BudgetedLoads(per_s=1, timeout_s=30.0)
    budgeted = loads.wrap(store.load)
    tasks = [asyncio.create_task(budgeted(f"t{i}")) for i in range(10)]
    for n in range(1, 11):  # one at a time through a budget of one
        await store.called.wait()
        store.called.clear()
        assert len(store.calls) == n
        store.gates[n - 1].set()
    assert await asyncio.gather(*tasks) == [f"T{i}" for i in range(10)]
    assert loads.refusals == 0


async def test_a_failed_lookup_gives_its_token_back() -> None:
    async def broken(_name: str) -> str | None:
        raise TenantStoreUnavailable()

    loads = BudgetedLoads(per_s=1, timeout_s=0.05)
    budgeted = loads.wrap(broken)
    for _ in range(3):
        with pytest.raises(TenantStoreUnavailable):
            await budgeted("x")
    assert loads.refusals == 0


async def test_waiters_are_served_first_come_first_served_as_tokens_refill() -> None:
    store = Store(set())
    loads = BudgetedLoads(per_s=20, timeout_s=30.0)
    budgeted = loads.wrap(store.load)
    for i in range(20):  # the burst, spent on misses
        assert await budgeted(f"x{i}") is None
    waiting = [asyncio.create_task(budgeted(f"late{i}")) for i in range(5)]
    assert await asyncio.gather(*waiting) == [None] * 5
    assert store.calls[20:] == [f"late{i}" for i in range(5)]  # in the order they came
    assert loads.refusals == 0


async def test_a_waiter_that_gives_up_does_not_keep_a_token() -> None:
    store = Store({"acme"}, gated=True)
    loads = BudgetedLoads(per_s=1, timeout_s=30.0)
    budgeted = loads.wrap(store.load)
    first = asyncio.create_task(budgeted("acme"))
    await store.called.wait()
    assert loads.budget.wait_s(time.monotonic()) > 0  # spent: the next two must queue
    leaving = asyncio.create_task(budgeted("acme"))
    staying = asyncio.create_task(budgeted("acme"))
    await asyncio.sleep(0)  # both are queued now
    leaving.cancel()
    store.gates[0].set()  # a hit: its token goes to the next waiter still there
    assert await first == "ACME"
    while len(store.gates) < 2:
        store.called.clear()
        await store.called.wait()
    store.gates[1].set()
    assert await staying == "ACME"
    assert leaving.cancelled()
    assert store.calls == ["acme", "acme"]


async def test_queueing_and_querying_share_one_timeout() -> None:
    store = Store(set(), gated=True)  # a store that never answers
    loads = BudgetedLoads(per_s=1, timeout_s=0.05)
    budgeted = loads.wrap(store.load)
    with pytest.raises(TenantStoreUnavailable) as failed:
        await budgeted("x")
    assert failed.value.headers == {}  # an outage, not the budget
    assert loads.budget.try_take(time.monotonic())  # its token was given back


async def test_known_names_bypass_the_budget_after_a_flush_during_a_flood() -> None:
    """A flood has spent the budget and its lookups are queued; then a NOTIFY or the listener's
    reconnection flushes the cache. The tenant that was cached is loaded at once, not queued
    behind the flood (CONTRACT §3: a flood never evicts a known tenant or key)."""
    store = Store({"acme"})
    loads = BudgetedLoads(per_s=2, timeout_s=30.0)
    cache: LoadingCache[str, str | None] = LoadingCache(
        loads.wrap(store.load), ttl_s=60.0, stale_if_error_s=300.0
    )
    assert await cache.get("acme") == "ACME"
    assert await cache.get("x0") is None
    assert await cache.get("x1") is None  # the budget is spent
    flood = [asyncio.create_task(cache.get(f"flood{i}")) for i in range(20)]
    await asyncio.sleep(0)  # the flood is queued for tokens
    assert store.calls == ["acme", "x0", "x1"]
    cache.clear()  # the flush
    assert await cache.get("acme") == "ACME"  # not queued: the flood is still waiting
    assert store.calls == ["acme", "x0", "x1", "acme"]
    for task in flood:
        task.cancel()
    await asyncio.gather(*flood, return_exceptions=True)
    await cache.close()


async def test_a_known_name_that_is_gone_spends_the_budget_again() -> None:
    store = Store({"acme"})
    loads = BudgetedLoads(per_s=1, timeout_s=0.05)
    budgeted = loads.wrap(store.load)
    assert await budgeted("acme") == "ACME"
    store.known.clear()  # the tenant was deleted
    assert await budgeted("acme") is None  # known until now: no token needed to learn it
    assert await budgeted("x") is None  # the one token, spent
    with pytest.raises(TenantStoreUnavailable):
        await budgeted("acme")  # a guess again, like any unknown name
    assert loads.refusals == 1
