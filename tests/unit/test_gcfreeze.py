"""proxy.gcfreeze: long-lived objects are frozen out of the cyclic collector's walks only at
start-up and once the first preload has filled the caches, never by the cache stores of steady
state (loads, refreshes, negative entries), which would freeze the requests in flight with them
and leak every reference cycle among them once they end."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable

from proxy.core.tenancy import Tenant
from proxy.gcfreeze import freeze_long_lived
from proxy.stores.cached import LoadingCache
from proxy.stores.identity import CachedIdentityStore
from tests.unit.test_cached import until

WAIT = 10.0  # a bound on the test, never a synchronisation
STORES = 5_000  # well past any batch a store-counting freezer would freeze at
ACME = Tenant(id="t1", slug="acme", status="Active")


class Node:
    me: object


class FakeDb:
    """The identity store's database: tenants by id (every fifth one unknown: a negative
    entry), and a preload of one tenant."""

    def __init__(self) -> None:
        self.loads = 0
        self.preloads = 0

    async def tenant_by_id(self, tenant_id: str) -> Tenant | None:
        self.loads += 1
        n = int(tenant_id)
        return None if n % 5 == 0 else Tenant(id=tenant_id, slug=f"s{n}", status="Active")

    async def stream_names(
        self,
        max_entries: int,
        on_tenant: Callable[[Tenant], None],
        on_prefix: Callable[[str], None],
    ) -> int | None:
        self.preloads += 1
        on_tenant(ACME)
        on_prefix("fr_live_abcd")
        return 2


def _store(preload_max_entries: int, ttl_s: float = 30.0) -> tuple[CachedIdentityStore, FakeDb]:
    store = CachedIdentityStore(
        "postgresql://127.0.0.1:1/unused",
        ttl_s=ttl_s,
        stale_if_error_s=300,
        timeout_s=1,
        max_miss_lookups_per_s=100,
        preload_max_entries=preload_max_entries,
    )
    db = store.db = FakeDb()  # type: ignore[assignment]
    return store, db  # type: ignore[return-value]


async def test_steady_state_stores_freeze_nothing_and_a_request_alive_meanwhile_is_freed() -> None:
    # A TTL so short that every second lookup is a background refresh.
    store, db = _store(preload_max_entries=0, ttl_s=1e-9)
    done = asyncio.Event()

    async def request_in_flight() -> weakref.ref[Node]:
        cycle = Node()
        cycle.me = cycle  # like a request's task, protocol and transport: only GC frees it
        probe = weakref.ref(cycle)
        await done.wait()
        return probe

    request = asyncio.create_task(request_in_flight())
    frozen = gc.get_freeze_count()
    for i in range(STORES):
        await store.by_id(str(i))
    for i in range(STORES):
        await store.by_id(str(i))  # stale: answered at once, refreshed in the background
    await until(lambda: store.tenants.loads_in_flight == 0)
    assert db.loads == 2 * STORES  # every lookup stored an entry, negative ones included
    assert store.tenants.negative_entries == STORES // 5
    done.set()
    probe = await request
    del request
    assert gc.get_freeze_count() == frozen
    gc.collect()
    assert probe() is None  # the ended request's cycle was collected, not leaked frozen
    await store.tenants.close()


async def test_the_first_preload_freezes_once_its_entries_are_stored_and_no_later_one() -> None:
    store, db = _store(preload_max_entries=1_000)
    entries_at_freeze: list[int] = []
    store.freeze = lambda: entries_at_freeze.append(len(store.tenants))
    store.flush()  # what the listener's first connection calls
    await asyncio.wait_for(store.preloaded.wait(), WAIT)
    assert entries_at_freeze == [2]  # acme under its slug and its id, already stored
    store.flush()  # a reconnection: preloaded again, with requests being served
    await until(lambda: db.preloads == 2 and not store.preload.running)
    assert store.tenants.peek(("slug", "acme")) == ACME
    assert entries_at_freeze == [2]
    await store.preload.stop()


async def test_frozen_entries_are_out_of_the_collectors_reach_and_garbage_is_not_frozen() -> None:
    async def load(key: str) -> Tenant:
        return Tenant(id=f"id-{key}", slug=key, status="Active")

    cache: LoadingCache[str, Tenant] = LoadingCache(load, ttl_s=30, stale_if_error_s=0)
    cycle = Node()
    cycle.me = cycle  # garbage once dropped: must be collected, not frozen
    probe = weakref.ref(cycle)
    del cycle
    for i in range(50):
        await cache.get(f"t{i}")
    freeze_long_lived()
    try:
        walked = {id(o) for o in gc.get_objects()}  # what a collection walks: not the frozen
        assert id(cache.peek("t0")) not in walked
        assert id(cache.peek("t49")) not in walked
        assert probe() is None  # the cycle was collected before the freeze
    finally:
        gc.unfreeze()
