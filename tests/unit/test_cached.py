"""proxy.stores.cached.LoadingCache: TTL, negative entries apart from hits, single-flight,
background refresh with backoff, stale-if-error and invalidation, with a fake clock and a
loader whose calls the test releases one by one."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest

from proxy.errors import TenantStoreUnavailable
from proxy.stores.base import MISSING
from proxy.stores.cached import LoadingCache

TTL = 30.0
STALE = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Loader:
    """Reads ``values`` when a call starts (like a query's snapshot); with ``gated``, each call
    then waits for its own event in ``gates``; fails at the end while ``fail`` is set."""

    def __init__(self, values: dict[str, str] | None = None, *, gated: bool = False) -> None:
        self.values = dict(values or {})
        self.gated = gated
        self.fail = False
        self.calls: list[str] = []
        self.gates: list[asyncio.Event] = []

    async def __call__(self, key: str) -> str | None:
        self.calls.append(key)
        value = self.values.get(key)
        if self.gated:
            gate = asyncio.Event()
            self.gates.append(gate)
            await gate.wait()
        if self.fail:
            raise TenantStoreUnavailable()
        return value


async def until(condition: Callable[[], bool], max_turns: int = 10_000) -> None:
    """Give the loop turns until ``condition`` holds (tasks run synchronously up to their
    first real suspension, so this is a bounded poll, not a timing guess)."""
    for _ in range(max_turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def make(
    loader: Loader, clock: Clock | None = None, **kwargs: float
) -> LoadingCache[str, str | None]:
    options: dict[str, float] = {"ttl_s": TTL, "stale_if_error_s": STALE, **kwargs}
    return LoadingCache(
        loader,
        ttl_s=options["ttl_s"],
        stale_if_error_s=options["stale_if_error_s"],
        maxsize=int(options.get("maxsize", 100_000)),
        miss_maxsize=int(options.get("miss_maxsize", 100_000)),
        clock=clock or Clock(),
        jitter=lambda: 0.5,
        lifetime_jitter=lambda: 0.0,  # fresh for the whole TTL unless a test says otherwise
    )


async def test_fresh_entries_are_served_without_loading() -> None:
    loader = Loader({"a": "A"})
    cache = make(loader)
    assert await cache.get("a") == "A"
    assert await cache.get("a") == "A"
    assert loader.calls == ["a"]
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.peek("a") == "A"
    assert cache.peek("b") is None
    assert loader.calls == ["a"]  # peek never loads


async def test_ttl_expiry_without_a_stale_window_loads_again() -> None:
    clock = Clock()
    loader = Loader({"a": "v1"})
    cache = make(loader, clock, stale_if_error_s=0.0)
    assert await cache.get("a") == "v1"
    loader.values["a"] = "v2"
    clock.now += TTL - 0.001
    assert await cache.get("a") == "v1"
    assert loader.calls == ["a"]
    clock.now += 0.001  # exactly ttl after the load: gone
    assert await cache.get("a") == "v2"
    assert loader.calls == ["a", "a"]


async def test_past_its_ttl_an_entry_answers_at_once_and_refreshes_in_the_background() -> None:
    clock = Clock()
    loader = Loader({"a": "v1"})
    cache = make(loader, clock)
    assert await cache.get("a") == "v1"
    loader.values["a"] = "v2"
    loader.gated = True
    clock.now += TTL
    # Ten requests past the TTL: all answered from the cache, one refresh between them.
    for _ in range(10):
        assert await cache.get("a") == "v1"
    await until(lambda: len(loader.gates) == 1)
    assert loader.calls == ["a", "a"]
    assert cache.stale_served == 10
    loader.gates[0].set()
    await until(lambda: cache.peek("a") == "v2")
    assert await cache.get("a") == "v2"
    assert loader.calls == ["a", "a"]
    assert cache.hits == 1


async def test_negative_entries_are_cached() -> None:
    clock = Clock()
    loader = Loader()
    cache = make(loader, clock)
    for _ in range(5):
        assert await cache.get("nobody") is None
    assert loader.calls == ["nobody"]
    assert cache.hits == 4
    assert cache.negative_entries == 1
    loader.values["nobody"] = "now known"
    clock.now += TTL
    assert await cache.get("nobody") is None  # past its TTL: answered, then refreshed
    await until(lambda: cache.peek("nobody") == "now known")
    assert await cache.get("nobody") == "now known"
    assert loader.calls == ["nobody", "nobody"]
    assert cache.negative_entries == 0


async def test_concurrent_cold_gets_share_one_load() -> None:
    loader = Loader({"cold": "V"}, gated=True)
    cache = make(loader)
    arrived = 0

    async def caller() -> str | None:
        nonlocal arrived
        arrived += 1  # get() runs from here to its first suspension without yielding
        return await cache.get("cold")

    tasks = [asyncio.create_task(caller()) for _ in range(1000)]
    await until(lambda: arrived == 1000 and len(loader.gates) == 1)
    assert loader.calls == ["cold"]
    loader.gates[0].set()
    results = await asyncio.gather(*tasks)
    assert results == ["V"] * 1000
    assert loader.calls == ["cold"]
    assert cache.misses == 1 and cache.hits == 0
    assert await cache.get("cold") == "V"
    assert loader.calls == ["cold"]


async def test_a_waiter_that_goes_away_does_not_cancel_the_load_for_the_others() -> None:
    loader = Loader({"cold": "V"}, gated=True)
    cache = make(loader)
    first = asyncio.create_task(cache.get("cold"))
    second = asyncio.create_task(cache.get("cold"))
    await until(lambda: len(loader.gates) == 1)
    first.cancel()
    loader.gates[0].set()
    assert await second == "V"
    assert first.cancelled()
    assert cache.peek("cold") == "V"


async def test_failure_with_nothing_cached_fails_every_waiter() -> None:
    loader = Loader({"k": "V"}, gated=True)
    cache = make(loader)
    loader.fail = True
    tasks = [asyncio.create_task(cache.get("k")) for _ in range(100)]
    await until(lambda: len(loader.gates) == 1)
    loader.gates[0].set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, TenantStoreUnavailable) for r in results)
    assert loader.calls == ["k"]
    assert len(cache) == 0
    # nothing is remembered about the failure: the next get tries the store again
    loader.gated, loader.fail = False, False
    assert await cache.get("k") == "V"
    assert loader.calls == ["k", "k"]


async def test_failed_refreshes_back_off_while_the_stale_entry_keeps_answering() -> None:
    clock = Clock()
    loader = Loader({"k": "old"})
    cache = make(loader, clock)
    assert await cache.get("k") == "old"
    loader.values["k"] = "new"
    loader.fail = True
    clock.now += TTL + 1
    assert await cache.get("k") == "old"  # answered at once; a refresh starts behind it
    await until(lambda: cache.refresh_failures == 1)
    assert loader.calls == ["k", "k"]
    # Within the backoff (0.5-1 s after the failure, jitter 0.5 here: 0.75 s), no new refresh.
    for _ in range(20):
        assert await cache.get("k") == "old"
    clock.now += 0.7
    assert await cache.get("k") == "old"
    assert cache.loads_in_flight == 0  # a refresh would have started in get()
    assert loader.calls == ["k", "k"]
    # Past it, one more; after a second failure the wait doubles (1-2 s, here 1.5 s).
    clock.now += 0.1
    assert await cache.get("k") == "old"
    await until(lambda: cache.refresh_failures == 2)
    assert loader.calls == ["k", "k", "k"]
    clock.now += 1.4
    assert await cache.get("k") == "old"
    assert cache.loads_in_flight == 0  # a refresh would have started in get()
    assert loader.calls == ["k", "k", "k"]
    # The store is back: the next refresh replaces the entry and the failures are forgotten.
    loader.fail = False
    clock.now += 0.2
    assert await cache.get("k") == "old"
    await until(lambda: cache.peek("k") == "new")
    assert await cache.get("k") == "new"
    assert loader.calls == ["k", "k", "k", "k"]


async def test_no_caller_waits_for_a_refresh_that_hangs() -> None:
    """A black-holed store: the refresh never finishes, and nobody waits for it."""
    clock = Clock()
    loader = Loader({"k": "old"})
    cache = make(loader, clock)
    await cache.get("k")
    clock.now += TTL
    loader.gated = True
    results = [await cache.get("k") for _ in range(50)]  # each returns without the loader
    assert results == ["old"] * 50
    await until(lambda: len(loader.gates) == 1)
    assert loader.calls == ["k", "k"]  # one refresh in flight, however many requests
    await cache.close()  # stops the hanging refresh
    assert cache.peek("k") == "old"


async def test_failure_beyond_ttl_plus_stale_raises() -> None:
    clock = Clock()
    loader = Loader({"k": "old"})
    cache = make(loader, clock)
    await cache.get("k")
    loader.fail = True
    clock.now += TTL + STALE - 0.001
    assert await cache.get("k") == "old"
    clock.now += 0.001
    with pytest.raises(TenantStoreUnavailable):
        await cache.get("k")
    assert cache.stale_served == 1


async def test_stale_entry_ages_from_its_original_load() -> None:
    """Serving a stale value must not renew it: it still expires at ttl + stale."""
    clock = Clock()
    loader = Loader({"k": "old"})
    cache = make(loader, clock)
    await cache.get("k")
    loader.fail = True
    clock.now += TTL + 1
    assert await cache.get("k") == "old"
    await until(lambda: cache.refresh_failures == 1)
    clock.now += STALE
    with pytest.raises(TenantStoreUnavailable):
        await cache.get("k")


async def test_invalidate_during_a_load_answers_its_waiters_but_does_not_store() -> None:
    loader = Loader({"k": "old"}, gated=True)
    cache = make(loader)
    waiters = [asyncio.create_task(cache.get("k")) for _ in range(10)]
    await until(lambda: len(loader.gates) == 1)
    # the row changes after the load read it; the NOTIFY arrives while it is in flight
    loader.values["k"] = "new"
    cache.invalidate(["k"])
    loader.gates[0].set()
    assert await asyncio.gather(*waiters) == ["old"] * 10
    assert len(cache) == 0
    loader.gated = False
    assert await cache.get("k") == "new"
    assert loader.calls == ["k", "k"]
    assert await cache.get("k") == "new"
    assert loader.calls == ["k", "k"]


async def test_a_get_after_invalidate_does_not_join_the_older_load() -> None:
    loader = Loader({"k": "old"}, gated=True)
    cache = make(loader)
    before = asyncio.create_task(cache.get("k"))
    await until(lambda: len(loader.gates) == 1)
    loader.values["k"] = "new"
    cache.invalidate(["k"])
    after = [asyncio.create_task(cache.get("k")) for _ in range(10)]
    await until(lambda: len(loader.gates) == 2)
    # the older load finishing first must neither answer nor disturb the newer one
    loader.gates[0].set()
    assert await before == "old"
    assert not any(t.done() for t in after)
    loader.gates[1].set()
    assert await asyncio.gather(*after) == ["new"] * 10
    assert loader.calls == ["k", "k"]
    assert await cache.get("k") == "new"
    assert loader.calls == ["k", "k"]


async def test_invalidated_stale_entry_is_not_served_while_its_refresh_runs() -> None:
    clock = Clock()
    loader = Loader({"k": "old"})
    cache = make(loader, clock)
    await cache.get("k")
    clock.now += TTL + 1
    loader.gated, loader.fail = True, True
    assert await cache.get("k") == "old"
    await until(lambda: len(loader.gates) == 1)
    cache.invalidate(["k"])
    waiter = asyncio.create_task(cache.get("k"))  # nothing cached: a load of its own
    await until(lambda: len(loader.gates) == 2)
    loader.gates[0].set()
    loader.gates[1].set()
    with pytest.raises(TenantStoreUnavailable):
        await waiter
    assert cache.peek("k") is None
    assert cache.refresh_failures == 0  # nothing cached to back off


async def test_misses_never_evict_hits() -> None:
    values = {f"known{i}": f"v{i}" for i in range(4)}
    loader = Loader(values)
    cache = make(loader, maxsize=4, miss_maxsize=8)
    for key in values:
        await cache.get(key)
    for i in range(1000):  # a flood of unknown names
        assert await cache.get(f"random{i}") is None
    assert cache.negative_entries == 8
    calls = len(loader.calls)
    for key, value in values.items():
        assert await cache.get(key) == value
    assert len(loader.calls) == calls  # every known name still cached
    # A name that becomes known moves from the misses to the hits.
    loader.values["random999"] = "late"
    cache.invalidate(["random999"])
    assert await cache.get("random999") == "late"
    assert cache.negative_entries == 7


async def test_invalidate_only_drops_the_named_keys() -> None:
    loader = Loader({"a": "A", "b": "B"})
    cache = make(loader)
    await cache.get("a")
    await cache.get("b")
    cache.invalidate(["a", "missing"])
    assert cache.peek("a") is None and cache.peek("b") == "B"
    await cache.get("b")
    assert loader.calls == ["a", "b"]
    await cache.get("a")
    assert loader.calls == ["a", "b", "a"]


async def test_clear() -> None:
    loader = Loader({"a": "A", "b": "B"})
    cache = make(loader)
    await cache.get("a")
    await cache.get("b")
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0
    await cache.get("a")
    assert loader.calls == ["a", "b", "a"]
    # a load in flight during clear() answers its waiter but is not stored
    loader.gated = True
    task = asyncio.create_task(cache.get("b"))
    await until(lambda: len(loader.gates) == 1)
    cache.clear()
    loader.gates[0].set()
    assert await task == "B"
    assert cache.peek("b") is None


async def test_maxsize_bounds_the_cache() -> None:
    loader = Loader({str(i): f"v{i}" for i in range(50)})
    cache = make(loader, maxsize=8)
    for i in range(50):
        assert await cache.get(str(i)) == f"v{i}"
        assert len(cache) <= 8
    assert len(cache) == 8
    calls = len(loader.calls)
    assert await cache.get("49") == "v49"  # the most recent entries stay
    assert len(loader.calls) == calls
    assert await cache.get("0") == "v0"  # the oldest was evicted
    assert len(loader.calls) == calls + 1


async def test_cached_answers_without_waiting_and_says_when_a_load_is_needed() -> None:
    clock = Clock()
    loader = Loader({"a": "A"})
    cache = make(loader, clock)
    assert cache.cached("a") is MISSING and loader.calls == []  # never starts a load itself
    assert await cache.get("a") == "A"
    assert cache.cached("a") == "A"  # a plain call: no coroutine, nothing to await
    assert cache.cached("nothing") is MISSING
    assert (cache.hits, cache.misses) == (1, 1)
    clock.now += TTL + 1  # stale: still answered at once, its refresh in the background
    assert cache.cached("a") == "A"
    await until(lambda: loader.calls == ["a", "a"])
    assert cache.stale_served == 1


async def test_entries_are_refreshed_ahead_of_their_ttl_at_spread_ages() -> None:
    clock = Clock()
    loader = Loader({"a": "v1", "b": "v1"})
    # a: fresh for 75% of the TTL, b (and a's refreshed entry): for all of it
    spreads = itertools.chain([1.0], itertools.repeat(0.0))
    cache: LoadingCache[str, str | None] = LoadingCache(
        loader,
        ttl_s=TTL,
        stale_if_error_s=STALE,
        clock=clock,
        lifetime_jitter=lambda: next(spreads),
    )
    assert await cache.get("a") == "v1"
    assert await cache.get("b") == "v1"
    loader.values.update(a="v2", b="v2")
    clock.now += 0.8 * TTL
    assert await cache.get("a") == "v1"  # answered at once, refreshed in the background
    assert await cache.get("b") == "v1"  # not due yet
    await until(lambda: cache.peek("a") == "v2")
    assert loader.calls == ["a", "b", "a"]
    assert cache.stale_served == 0  # within the TTL, a refresh ahead is no stale answer
    assert cache.peek("b") == "v1"


async def test_primed_entries_expire_each_at_its_own_moment_within_the_stale_window() -> None:
    clock = Clock()
    draws = itertools.cycle([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    cache: LoadingCache[str, str | None] = LoadingCache(
        Loader({"loaded": "L"}),
        ttl_s=TTL,
        stale_if_error_s=STALE,
        clock=clock,
        lifetime_jitter=lambda: next(draws),
    )
    keep = TTL + STALE
    primed = [f"p{i}" for i in range(30)]
    for key in primed:
        cache.prime(key, key.upper())
    assert await cache.get("loaded") == "L"

    def alive() -> int:
        return sum(cache.peek(key) is not None for key in primed)

    clock.now += keep / 2 - 0.001
    assert alive() == 30  # none before half the window
    clock.now += keep / 4
    assert 0 < alive() < 30  # some gone, some kept: spread, not all at one moment
    clock.now += keep / 4 + 0.001
    assert alive() == 0  # none past ttl + stale_if_error: stale answers stay in the window
    assert cache.peek("loaded") is None


async def test_a_loaded_entry_keeps_the_whole_window_however_its_lifetime_is_drawn() -> None:
    clock = Clock()
    cache: LoadingCache[str, str | None] = LoadingCache(
        Loader({"a": "A"}),
        ttl_s=TTL,
        stale_if_error_s=STALE,
        clock=clock,
        lifetime_jitter=lambda: 1.0,
    )
    assert await cache.get("a") == "A"
    clock.now += TTL + STALE - 0.001
    assert cache.peek("a") == "A"
    cache.prime("b", "B")
    clock.now += (TTL + STALE) / 2
    assert cache.peek("b") is None  # primed with the largest draw: half the window
