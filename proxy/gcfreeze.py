"""Keep long-lived cache entries out of the cyclic collector's walks: freeze after bulk loads.

A full collection walks every tracked object the process holds, so with the identity caches
full (100,000 tenants and 200,000 key prefixes: about 4 tracked objects each) one took 570-950
ms on this machine, a pause for every request in flight. ``gc.freeze()`` (Python >= 3.7) moves
every object tracked so far into a permanent generation that collections skip. Start-up does it
once (``app.freeze_startup_objects``); entries loaded later are new objects, so the caches call
``grew`` for each one they store, and every ``every`` stores the process collects what is not
frozen yet (the entries stored since the last freeze and the requests in flight: a short walk)
and freezes the rest. Measured with the caches above filled this way: the longest full collection
fell to under a millisecond (loadtests/bench_scale.py measures it on a running proxy).

Collecting first means no garbage cycle is ever frozen (a frozen cycle would never be freed).
A frozen entry that is evicted or replaced later is still freed: by its reference count, like
every cache entry (they hold no cycles).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

FREEZE_EVERY_STORES = 2_000


class GrowthFreezer:
    def __init__(
        self,
        every: int = FREEZE_EVERY_STORES,
        *,
        collect: Callable[[], object] = gc.collect,
        freeze: Callable[[], None] = gc.freeze,
    ) -> None:
        self._every = every
        self._collect = collect
        self._freeze = freeze
        self._pending = 0
        self._scheduled = False
        self.freezes = 0

    def grew(self) -> None:
        """One more long-lived object graph (a cache entry) was stored."""
        self._pending += 1
        if self._pending >= self._every and not self._scheduled:
            self._scheduled = True
            # Soon, not now: the entry's caller is mid-request; the freeze runs between two
            # callbacks of the loop, as a collection triggered by an allocation would.
            asyncio.get_running_loop().call_soon(self.freeze_now)

    def freeze_now(self) -> None:
        self._scheduled = False
        self._pending = 0
        self._collect()
        self._freeze()
        self.freezes += 1
