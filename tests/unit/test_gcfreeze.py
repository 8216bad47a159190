"""Cache entries stored after start-up are frozen out of the cyclic collector's walks
(proxy.gcfreeze), every ``every`` stores, after collecting what is garbage."""

from __future__ import annotations

import asyncio
import gc
import weakref

from proxy.core.tenancy import Tenant
from proxy.gcfreeze import GrowthFreezer
from proxy.stores.cached import LoadingCache


class Node:
    me: object


async def test_a_freeze_is_scheduled_every_n_stores_collecting_first() -> None:
    calls: list[str] = []
    freezer = GrowthFreezer(
        3, collect=lambda: calls.append("collect"), freeze=lambda: calls.append("freeze")
    )
    for _ in range(5):
        freezer.grew()
    assert calls == []  # not in the caller's turn
    await asyncio.sleep(0)
    assert calls == ["collect", "freeze"]  # once, however many stores passed the mark
    freezer.grew()
    await asyncio.sleep(0)
    assert freezer.freezes == 1  # the count starts again after a freeze
    freezer.grew()
    freezer.grew()
    await asyncio.sleep(0)
    assert calls == ["collect", "freeze"] * 2


async def test_every_store_of_the_loading_cache_counts_hits_and_misses_alike() -> None:
    stored = 0

    def grew() -> None:
        nonlocal stored
        stored += 1

    async def load(key: str) -> str | None:
        return None if key.startswith("unknown") else key.upper()

    cache: LoadingCache[str, str | None] = LoadingCache(
        load, ttl_s=30, stale_if_error_s=0, on_store=grew
    )
    await cache.get("a")
    await cache.get("a")  # a hit stores nothing
    await cache.get("unknown-1")
    assert stored == 2


async def test_frozen_entries_are_out_of_the_collectors_reach_and_garbage_is_not_frozen() -> None:
    async def load(key: str) -> Tenant:
        return Tenant(id=f"id-{key}", slug=key, status="Active")

    freezer = GrowthFreezer(50)
    cache: LoadingCache[str, Tenant] = LoadingCache(
        load, ttl_s=30, stale_if_error_s=0, on_store=freezer.grew
    )
    cycle = Node()
    cycle.me = cycle  # garbage once dropped: must be collected, not frozen
    probe = weakref.ref(cycle)
    del cycle
    for i in range(50):
        await cache.get(f"t{i}")
    await asyncio.sleep(0)
    assert freezer.freezes == 1
    try:
        walked = {id(o) for o in gc.get_objects()}  # what a collection walks: not the frozen
        assert id(cache.peek("t0")) not in walked
        assert id(cache.peek("t49")) not in walked
        assert probe() is None  # the cycle was collected before the freeze
    finally:
        gc.unfreeze()
