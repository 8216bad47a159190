"""The identity store's preload is a background job (proxy.background.Once): an unexpected
exception while streaming the names is logged, counted and retried with backoff until a preload
completes, instead of killing the preload and leaving /readyz at 503 for good; a flush (the
LISTEN link reconnected) abandons the preload under way and starts a fresh one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxy.background import job_failures
from proxy.core.tenancy import Tenant
from proxy.stores.identity import CachedIdentityStore

WAIT = 10.0  # a bound on the test, never a synchronisation
ACME = Tenant(id="t1", slug="acme", status="Active")
PREFIX = "fr_live_abcd"


class FakeNames:
    """``stream_names`` of a database: the first ``failures`` calls raise a bug, not a DB error;
    a call while ``hold`` is unset waits for it."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.hold = asyncio.Event()
        self.hold.set()
        self.entered = asyncio.Event()  # set by each call

    async def stream_names(
        self,
        max_entries: int,
        on_tenant: Callable[[Tenant], None],
        on_prefix: Callable[[str], None],
    ) -> int | None:
        self.calls += 1
        self.entered.set()
        on_tenant(ACME)  # a partial stream before the failure
        if self.calls <= self.failures:
            raise KeyError("unexpected column")
        await self.hold.wait()
        on_prefix(PREFIX)
        return 2


def _store(names: FakeNames) -> CachedIdentityStore:
    store = CachedIdentityStore(
        "postgresql://127.0.0.1:1/unused",
        ttl_s=30,
        stale_if_error_s=300,
        timeout_s=1,
        max_miss_lookups_per_s=100,
        preload_max_entries=1_000,
    )
    store.db = names  # type: ignore[assignment]
    return store


async def test_a_preload_that_raises_is_retried_counted_and_completes() -> None:
    names = FakeNames(failures=1)
    store = _store(names)
    store.flush()  # what the listener's (re)connection calls
    await asyncio.wait_for(store.preloaded.wait(), WAIT)
    assert names.calls == 2
    assert store.preload.failures == 1
    (sample,) = job_failures([store.preload]).samples
    assert sample.labels == {"background_job": "preload"} and sample.value == 1
    assert store.index.complete
    assert store.cached_tenant("slug", "acme") == ACME
    assert store.cached_keys("fr_live_zzzz") == ()  # unknown once complete: no query
    await store.preload.stop()


async def test_a_flush_abandons_the_preload_under_way_and_starts_again() -> None:
    names = FakeNames(failures=0)
    names.hold.clear()
    store = _store(names)
    store.flush()
    await asyncio.wait_for(names.entered.wait(), WAIT)
    names.entered.clear()
    store.flush()
    await asyncio.wait_for(names.entered.wait(), WAIT)
    assert names.calls == 2
    assert not store.preloaded.is_set()
    names.hold.set()
    await asyncio.wait_for(store.preloaded.wait(), WAIT)
    assert store.preload.failures == 0  # abandoned, not failed
    assert store.index.complete


async def test_stop_abandons_a_preload_that_hangs() -> None:
    names = FakeNames(failures=0)
    names.hold.clear()
    store = _store(names)
    store.flush()
    await asyncio.wait_for(names.entered.wait(), WAIT)
    await asyncio.wait_for(store.preload.stop(), WAIT)
    assert not store.preload.running and not store.preloaded.is_set()
