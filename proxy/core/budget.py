"""The miss budget of CONTRACT §3: what a flood of unknown names may cost the tenant store.

A token bucket of ``burst`` tokens refilled at ``rate`` a second (``core.bucket`` is the
per-minute bucket of the rate limits, without reservations; this one is per second and lets a
token be given back). A lookup that must ask the store takes a token first and gives it back
when it found something, so only lookups that turn out to miss spend the budget: with no flood
under way the bucket stays full, and existing names are never refused, on a cold cache too.
Taking before asking (rather than charging afterwards) bounds a first wave as well: a thousand
concurrent unknown names cannot all start a query before the first of them has missed.
"""

from __future__ import annotations


class MissBudget:
    """Time is passed in (seconds on any monotonic clock); no I/O."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._updated = now

    def _refill(self, now: float) -> None:
        # max(0, ...): a clock that steps backwards must not drain the bucket.
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._updated) * self.rate)
        self._updated = now

    def try_take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def give_back(self, now: float) -> None:
        """Return a token taken by a lookup that found its name (or never reached the store)."""
        self._refill(now)
        self._tokens = min(self.burst, self._tokens + 1.0)

    def wait_s(self, now: float) -> float:
        """Seconds until a token is there, if nobody takes or gives back one meanwhile."""
        self._refill(now)
        return max(0.0, (1.0 - self._tokens) / self.rate)
