"""A loading cache in front of a slow store: TTL, negative entries, single-flight,
stale-if-error, and invalidation that cannot be undone by a racing load.

- ``None`` results are cached like any other (negative entries), so a flood of random Hosts or
  keys costs the database one query per distinct value, not one per request.
- Concurrent misses for one key share a single load (single-flight): a thousand requests for a
  cold host make one query.
- If a load fails, an entry past its TTL keeps serving for up to ``stale_if_error_s``
  (RFC 5861's stale-if-error, applied to our own cache); a key with nothing cached raises.
- ``invalidate`` bumps a generation counter: a load that started before the invalidation still
  answers its waiters but is not stored, so a NOTIFY can never be overwritten by older data;
  and it is detached, so a caller arriving after the invalidation starts a fresh load.

Bounded by ``cachetools.TTLCache`` (LRU within the TTL), whose TTL is ``ttl + stale_if_error``
so that stale entries survive exactly as long as they may be served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

from cachetools import TTLCache

from proxy.errors import TenantStoreUnavailable

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # A failed load with no waiters must not log "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


class LoadingCache(Generic[K, V]):
    def __init__(
        self,
        load: Callable[[K], Awaitable[V]],
        *,
        ttl_s: float,
        stale_if_error_s: float,
        maxsize: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._ttl = ttl_s
        self._clock = clock
        self._entries: TTLCache[K, tuple[V, float]] = TTLCache(
            maxsize=maxsize, ttl=ttl_s + stale_if_error_s, timer=clock
        )
        self._inflight: dict[K, asyncio.Future[V]] = {}
        self._generation = 0
        self.hits = 0
        self.misses = 0
        self.stale_served = 0

    async def get(self, key: K) -> V:
        entry = self._entries.get(key)
        if entry is not None and self._clock() - entry[1] < self._ttl:
            self.hits += 1
            return entry[0]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        self.misses += 1
        return await self._fill(key, entry)

    async def _fill(self, key: K, stale: tuple[V, float] | None) -> V:
        fut: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_retrieve)
        self._inflight[key] = fut
        generation = self._generation
        try:
            value = await self._load(key)
        except TenantStoreUnavailable as e:
            if stale is None or generation != self._generation:
                fut.set_exception(e)
                raise
            self.stale_served += 1
            value = stale[0]  # stale-if-error: keep its old load time, so it still ages out
        except BaseException:
            if not fut.done():
                fut.set_exception(TenantStoreUnavailable())
            raise
        else:
            if generation == self._generation:
                self._entries[key] = (value, self._clock())
        finally:
            # An invalidation may have detached this load already (and a newer one taken its
            # place): remove only our own.
            if self._inflight.get(key) is fut:
                del self._inflight[key]
        fut.set_result(value)
        return value

    def peek(self, key: K) -> V | None:
        """The cached value, fresh or stale, without loading (None also when absent)."""
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def invalidate(self, keys: Iterable[K]) -> None:
        self._generation += 1
        for key in keys:
            self._entries.pop(key, None)
            # A load already running may have read the old row: callers that arrive from now
            # on start a fresh one instead of joining it (its own waiters still get its value).
            self._inflight.pop(key, None)

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()
        self._inflight.clear()

    def __len__(self) -> int:
        return len(self._entries)
