"""A loading cache in front of a slow store: TTL, negative entries kept apart, single-flight,
refresh in the background, and invalidation that cannot be undone by a racing load.

- Results that say "nothing there" (``is_miss``: ``None``, an empty tuple) are cached too
  (negative entries), so a flood of random Hosts or keys costs the store one query per distinct
  value, not one per request; and they live in a cache of their own, bounded apart from the
  hits, so such a flood evicts other misses and never a known tenant or key (CONTRACT §3).
- Concurrent loads of one key share a single query (single-flight); the query runs in a task of
  its own, so a caller that goes away does not cancel it for the others.
- Refresh after write (Caffeine's ``refreshAfterWrite``; RFC 5861's stale-while-revalidate,
  applied to our own cache): an entry past its TTL is answered at once, and one background
  refresh per entry replaces it. A failed refresh backs off (``core.backoff``) before the entry
  tries again. An entry is kept ``ttl + stale_if_error`` after its last successful load, so
  while the store is unreachable (refusing, or black-holed) cached answers keep coming without
  waiting for it, for up to ``stale_if_error_s`` past their TTL; only a key with nothing cached
  waits for its load. Freshness does not rest on the TTL: NOTIFY evicts changed rows at once.
  Refresh ahead: each entry's background refresh starts at its own random age, 75-100% of the
  TTL, so entries loaded together do not all refresh (or expire) together.
- Entries stored in bulk (``prime``: a preload) each get their own lifetime, between half and
  all of ``ttl + stale_if_error``: a preloaded entry that sees no traffic is dropped at its own
  moment, not together with every other one loaded in the same second (a burst of misses).
- ``invalidate`` bumps a generation counter: a load that started before the invalidation still
  answers its waiters but is not stored, so a NOTIFY can never be overwritten by older data;
  and it is detached, so a caller arriving after the invalidation starts a fresh load.

Bounded by two ``cachetools.TTLCache`` (LRU within the TTL).
"""

from __future__ import annotations

import asyncio
import logging
import operator
import random
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cachetools import TTLCache

from proxy.core.backoff import backoff_s
from proxy.errors import TenantStoreUnavailable
from proxy.stores.base import MISSING, Missing

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
log = logging.getLogger("proxy.cache")
# First retry of a failed refresh after 0.5-1 s, then doubling up to 15-30 s: a dead database
# sees at most one query per cached entry every half minute, and a recovered one is noticed
# within seconds.
REFRESH_BACKOFF_BASE_S = 1.0
REFRESH_BACKOFF_CAP_S = 30.0
# Refresh-ahead: an entry is refreshed (in the background, answering at once meanwhile) at a
# random age between 75% and 100% of the TTL. Entries loaded together (a cold start, a burst of
# new tenants) then refresh spread over a quarter of the TTL instead of all at once; freshness
# itself rests on NOTIFY, the TTL only bounds what a missed notification can cost.
REFRESH_AHEAD_SHARE = 0.25
# A primed entry lives (1 - PRIMED_LIFETIME_SPREAD * jitter) x (ttl + stale_if_error): never
# longer than a loaded one, so stale answers stay within the stale-if-error window (RFC 5861).
PRIMED_LIFETIME_SPREAD = 0.5


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # A failed load with no waiters must not log "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    loaded_at: float
    fresh_for: float  # refreshed ahead of the TTL, at a jittered age
    expires_at: float  # dropped then (or when the TTLCache's own TTL ends, if earlier)
    failures: int = 0  # background refreshes failed in a row
    retry_at: float = 0.0  # no background refresh before this


class LoadingCache(Generic[K, V]):
    def __init__(
        self,
        load: Callable[[K], Awaitable[V]],
        *,
        ttl_s: float,
        stale_if_error_s: float,
        maxsize: int = 100_000,
        miss_maxsize: int = 10_000,
        is_miss: Callable[[V], bool] = operator.not_,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
        lifetime_jitter: Callable[[], float] = random.random,
    ) -> None:
        self._load = load
        self._ttl = ttl_s
        self._is_miss = is_miss
        self._clock = clock
        self._jitter = jitter
        self._lifetime_jitter = lifetime_jitter
        keep = self._keep = ttl_s + stale_if_error_s
        self._hits: TTLCache[K, _Entry[V]] = TTLCache(maxsize=maxsize, ttl=keep, timer=clock)
        self._misses: TTLCache[K, _Entry[V]] = TTLCache(maxsize=miss_maxsize, ttl=keep, timer=clock)
        self._inflight: dict[K, asyncio.Future[V]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._generation = 0
        self.hits = 0
        self.misses = 0
        self.stale_served = 0
        self.refresh_failures = 0

    def _find(self, key: K) -> _Entry[V] | None:
        entry = self._hits.get(key)
        if entry is None:
            return self._misses.get(key)
        if self._clock() < entry.expires_at:
            return entry
        del self._hits[key]  # a primed entry past its own, shorter, lifetime
        return None

    def cached(self, key: K) -> V | Missing:
        """``get``'s answer when it needs no waiting (an entry, fresh or stale: a stale one
        starts its refresh in the background), else ``MISSING``."""
        entry = self._find(key)
        if entry is None:
            return MISSING
        now = self._clock()
        age = now - entry.loaded_at
        if age < entry.fresh_for:
            self.hits += 1
            return entry.value
        if age < self._ttl:
            self.hits += 1  # still fresh, refreshed ahead of its TTL
        else:
            self.stale_served += 1
        if now >= entry.retry_at and key not in self._inflight:
            self._start_load(key)
        return entry.value

    async def get(self, key: K) -> V:
        value = self.cached(key)
        if not isinstance(value, Missing):
            return value
        pending = self._inflight.get(key)
        if pending is None:
            self.misses += 1
            pending = self._start_load(key)
        return await asyncio.shield(pending)

    def _start_load(self, key: K) -> asyncio.Future[V]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[V] = loop.create_future()
        fut.add_done_callback(_retrieve)
        self._inflight[key] = fut
        task = loop.create_task(self._load_into(key, fut, self._generation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fut

    async def _load_into(self, key: K, fut: asyncio.Future[V], generation: int) -> None:
        try:
            value = await self._load(key)
        except asyncio.CancelledError:
            fut.set_exception(TenantStoreUnavailable())
            raise
        except Exception as e:
            if not isinstance(e, TenantStoreUnavailable):
                # A bug, not an outage: say so, and answer as an outage would.
                log.error("cache load failed: %r", e)
                e = TenantStoreUnavailable()
            self._back_off(key, generation)
            fut.set_exception(e)
        else:
            if generation == self._generation:
                self._store(key, value)
            fut.set_result(value)
        finally:
            # An invalidation may have detached this load already (and a newer one taken its
            # place): remove only our own.
            if self._inflight.get(key) is fut:
                del self._inflight[key]

    def _store(self, key: K, value: V, lifetime: float | None = None) -> None:
        keep, drop = (
            (self._misses, self._hits) if self._is_miss(value) else (self._hits, self._misses)
        )
        drop.pop(key, None)
        fresh_for = self._ttl * (1 - REFRESH_AHEAD_SHARE * self._lifetime_jitter())
        lifetime = self._keep if lifetime is None else lifetime
        now = self._clock()
        keep[key] = _Entry(value, now, fresh_for, now + lifetime)

    def _back_off(self, key: K, generation: int) -> None:
        entry = self._find(key)
        if entry is None or generation != self._generation:
            return
        self.refresh_failures += 1
        entry.failures += 1
        entry.retry_at = self._clock() + backoff_s(
            entry.failures,
            base_s=REFRESH_BACKOFF_BASE_S,
            cap_s=REFRESH_BACKOFF_CAP_S,
            jitter=self._jitter(),
        )

    def prime(self, key: K, value: V) -> None:
        """Store a value loaded elsewhere (a bulk preload), as a load would have, with a
        lifetime of its own."""
        spread = 1 - PRIMED_LIFETIME_SPREAD * self._lifetime_jitter()
        self._store(key, value, self._keep * spread)

    def peek(self, key: K) -> V | None:
        """The cached value, fresh or stale, without loading (None also when absent)."""
        entry = self._find(key)
        return None if entry is None else entry.value

    def invalidate(self, keys: Iterable[K]) -> None:
        self._generation += 1
        for key in keys:
            self._hits.pop(key, None)
            self._misses.pop(key, None)
            # A load already running may have read the old row: callers that arrive from now
            # on start a fresh one instead of joining it (its own waiters still get its value).
            self._inflight.pop(key, None)

    def clear(self) -> None:
        self._generation += 1
        self._hits.clear()
        self._misses.clear()
        self._inflight.clear()

    async def close(self) -> None:
        """Stop the loads still running (background refreshes at shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def loads_in_flight(self) -> int:
        return len(self._inflight)

    @property
    def negative_entries(self) -> int:
        return len(self._misses)

    def __len__(self) -> int:
        return len(self._hits) + len(self._misses)
