"""Timing rules of background jobs as plain functions: no clock, no randomness of their own."""

from __future__ import annotations

from collections.abc import Sequence

# ±10% (CONTRACT §11): receivers that failed together do not all get their retries at the same
# instant (the thundering herd that "full jitter" in AWS's backoff article is about).
RETRY_JITTER = 0.1


def webhook_retry_delay(
    schedule_s: Sequence[float], attempt: int, status: int | None, unit: float
) -> float | None:
    """Seconds from the end of failed attempt ``attempt`` (1-based) to the next one, or None
    when there is none: a ``410 Gone`` is never retried, and after ``len(schedule_s) + 1``
    attempts the delivery has used them all. ``unit`` is a random number in [0, 1) that
    spreads the delay over ±10%."""
    if status == 410 or attempt < 1 or attempt > len(schedule_s):
        return None
    base = schedule_s[attempt - 1]
    return base * (1 + RETRY_JITTER * (2 * unit - 1))
