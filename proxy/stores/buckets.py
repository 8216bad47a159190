"""In-process token buckets: the embedded default when ``REDIS_URL`` is unset.

Exact for one process only; several processes each keep their own buckets. Buckets live in a
``cachetools.TTLCache`` whose TTL is the refill window: a bucket untouched for 60 s is full
again, so forgetting it changes no decision, and memory stays bounded under key churn.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import TTLCache

from proxy.core.bucket import WINDOW_S, BucketState, Decision, peek, take


class MemoryBucketStore:
    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_buckets: int = 1_000_000
    ) -> None:
        self._clock = clock
        self._buckets: TTLCache[str, BucketState] = TTLCache(
            maxsize=max_buckets, ttl=WINDOW_S, timer=clock
        )

    async def take(self, bucket: str, capacity: int) -> Decision:
        return self.take_now(bucket, capacity)

    def take_now(self, bucket: str, capacity: int) -> Decision:
        """``take`` for callers that cannot await (a Redis reply's callback falling back)."""
        state, decision = take(self._buckets.get(bucket), capacity, self._clock())
        self._buckets[bucket] = state
        return decision

    async def peek(self, bucket: str, capacity: int) -> Decision:
        return self.peek_now(bucket, capacity)

    def peek_now(self, bucket: str, capacity: int) -> Decision:
        return peek(self._buckets.get(bucket), capacity, self._clock())

    async def ready(self) -> bool:
        return True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass
