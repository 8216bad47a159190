"""Backoff with jitter for anything that retries on its own: a background job restarting after an
unexpected error, a flusher waiting for Postgres to return.

"Equal jitter" (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015): the wait is half
the exponential ceiling plus a random share of the other half, so processes that failed together
do not all come back in the same instant, and no wait collapses to zero.
"""

from __future__ import annotations


def backoff_s(failures: int, *, base_s: float, cap_s: float, jitter: float) -> float:
    """The wait after the ``failures``-th consecutive failure (1 for the first).

    ``jitter`` is a draw from [0, 1) passed in, so that the function stays pure: 0 gives the
    shortest wait, half the ceiling; values near 1 the longest, the ceiling itself.
    """
    if failures < 1:
        return 0.0
    ceiling = min(cap_s, base_s * (1 << min(failures - 1, 32)))
    return ceiling / 2 + ceiling / 2 * jitter
