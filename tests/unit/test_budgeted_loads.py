"""proxy.stores.identity.BudgetedLoads: only misses spend the budget; a lookup beyond it waits
for a token up to the store timeout, then is refused 503 with Retry-After: 1."""

from __future__ import annotations

import asyncio

import pytest

from proxy.errors import TenantStoreUnavailable
from proxy.stores.identity import BudgetedLoads


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
