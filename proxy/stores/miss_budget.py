"""Loads of client-chosen names (a Host, a key prefix, a challenge's domain) within the miss
budget of CONTRACT §3 (``core.budget`` holds the token math).

A load takes a token before it queries and gives it back when it found its name, so only
misses spend the budget. A load that finds no token joins a queue, first come first served,
and is handed a token as one is given back or refills; one timer serves the whole queue, so a
flood of waiters costs one wake-up per token, not one per waiter. A waiter not served within
``timeout_s`` (``tenancy.store_timeout_s``) is refused: 503 ``tenant_store_unavailable`` with
``Retry-After: 1``; the query then has what is left of that time.

A name a load has found is remembered (bounded, least recently found forgotten first) and
bypasses the budget from then on, until a load finds it gone: a cache flush (a NOTIFY, the
listener's reconnection) or an eviction during a flood then reloads known tenants and keys at
once instead of queueing them behind the flood's waiters, so the budget never refuses them
(CONTRACT §3). Only the database makes a name known, so a client cannot grow the bypass.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from cachetools import LRUCache

from proxy.core.budget import MissBudget
from proxy.errors import TenantStoreUnavailable

_V = TypeVar("_V")


class BudgetedLoads:
    def __init__(
        self,
        per_s: float,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_known: int = 100_000,
    ) -> None:
        self._clock = clock
        self._max_known = max_known
        self._timeout = timeout_s
        self.budget = MissBudget(per_s, per_s, clock())
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.refusals = 0

    def wrap(self, load: Callable[[str], Awaitable[_V]]) -> Callable[[str], Awaitable[_V]]:
        known: LRUCache[str, bool] = LRUCache(self._max_known)

        async def budgeted(key: str) -> _V:
            if key in known:
                value = await _within(self._timeout, load, key)
            else:
                started = self._clock()
                await self._take()
                try:
                    # Time spent queueing counts against the same store_timeout_s.
                    value = await _within(self._timeout - (self._clock() - started), load, key)
                except BaseException:
                    self._give_back()  # it never learnt whether the name exists
                    raise
                if value:
                    self._give_back()
            if value:
                known[key] = True
            else:
                known.pop(key, None)  # gone: its next lookup is a client's guess again
            return value

        return budgeted

    async def _take(self) -> None:
        if not self._waiters and self.budget.try_take(self._clock()):
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        self._arm()
        try:
            async with asyncio.timeout(self._timeout):
                await turn
        except TimeoutError:
            if turn.done() and not turn.cancelled():
                return  # handed a token just as the deadline passed: it is ours
            self.refusals += 1
            raise TenantStoreUnavailable(
                "too many lookups of unknown names; try again shortly",
                headers={"Retry-After": "1"},
            ) from None
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._give_back()  # the caller left holding a token: pass it on
            raise
        finally:
            if not turn.done():
                turn.cancel()  # skipped when its turn comes

    def _give_back(self) -> None:
        self.budget.give_back(self._clock())
        self._hand_over()

    def _hand_over(self) -> None:
        """Hand the tokens there are to the waiters at the head of the queue."""
        while self._waiters:
            if self._waiters[0].done():  # gave up waiting
                self._waiters.popleft()
                continue
            if not self.budget.try_take(self._clock()):
                break
            self._waiters.popleft().set_result(None)
        self._arm()

    def _arm(self) -> None:
        """One timer for the whole queue, firing when the next token has refilled."""
        if self._timer is not None or not self._waiters:
            return
        self._timer = asyncio.get_running_loop().call_later(
            self.budget.wait_s(self._clock()), self._refilled
        )

    def _refilled(self) -> None:
        self._timer = None
        self._hand_over()


async def _within(seconds: float, load: Callable[[str], Awaitable[_V]], key: str) -> _V:
    try:
        async with asyncio.timeout(seconds):
            return await load(key)
    except TimeoutError:
        raise TenantStoreUnavailable() from None
