"""Token-bucket math (CONTRACT §6), the rules every bucket store implements.

Capacity ``rpm`` tokens, refilled continuously at ``rpm / 60`` tokens a second; a request takes
one token; a rejected request takes nothing. The in-process store runs this function directly;
the Redis Lua script implements the same rules with Redis's clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WINDOW_S = 60.0
# The draft-ietf-httpapi-ratelimit-headers fields: lists of items, one per policy.
ITEM_FIELDS = ("RateLimit-Policy", "RateLimit")


@dataclass(frozen=True, slots=True)
class BucketState:
    tokens: float
    updated: float  # seconds, on the clock of whoever keeps the bucket


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int  # whole tokens left after this request
    reset_s: int  # seconds until the bucket is full again
    retry_after_s: int  # 0 when allowed; else whole seconds until one token, at least 1


def take(state: BucketState | None, capacity: int, now: float) -> tuple[BucketState, Decision]:
    """One request against a bucket at time ``now``; the Lua script in ``stores.redis`` is this
    function line for line, with Redis's clock."""
    tokens = _refilled(state, capacity, now)
    allowed = tokens >= 1.0
    if allowed:
        tokens -= 1.0
    return BucketState(tokens, now), decide(allowed, tokens, capacity)


def peek(state: BucketState | None, capacity: int, now: float) -> Decision:
    """What the bucket holds at ``now``, taking nothing: the figures for a request refused
    for another reason before its token was taken (the render quota, CONTRACT §13)."""
    tokens = _refilled(state, capacity, now)
    return decide(tokens >= 1.0, tokens, capacity)


def _refilled(state: BucketState | None, capacity: int, now: float) -> float:
    if state is None:
        return float(capacity)
    rate = capacity / WINDOW_S  # as the Lua script computes it, so that the two agree exactly
    # max(0, ...): a clock that steps backwards must not drain the bucket.
    return min(float(capacity), state.tokens + max(0.0, now - state.updated) * rate)


def decide(allowed: bool, tokens: float, capacity: int) -> Decision:
    """The decision (and its headers' figures) from the tokens left after the request.

    Seconds are ``missing * WINDOW_S / capacity``, not ``missing / (capacity / WINDOW_S)``: the
    rate is rarely exact in binary, and dividing by it made an empty bucket of 11 rpm (and a
    tenth of all capacities) report ``Reset: 61`` in a 60 s window. With whole tokens missing,
    this form is exact, so ``ceil`` never adds a second that is not there."""
    return Decision(
        allowed=allowed,
        limit=capacity,
        remaining=int(tokens),
        reset_s=_whole_seconds((capacity - tokens) * WINDOW_S / capacity),
        retry_after_s=0
        if allowed
        else max(1, _whole_seconds((1.0 - tokens) * WINDOW_S / capacity)),
    )


def nothing_allowed(capacity: int) -> Decision:
    """The decision for a capacity under one token, which admits nothing.

    The identity schema lets a key row say ``rate_limit_rpm = 0`` (or less). Such a capacity
    must never reach a store: the math above divides by it, and the Redis script, failing on
    it, failed its whole batch and tripped the limiter's breaker for every tenant (503 for all
    with ``failure_mode = "closed"``; with ``"open"`` the fallback even admitted the key)."""
    return Decision(
        allowed=False,
        limit=max(capacity, 0),
        remaining=0,
        reset_s=0,
        retry_after_s=int(WINDOW_S),  # retrying never helps; say so at the longest sensible wait
    )


def _whole_seconds(seconds: float) -> int:
    """Round up to whole seconds, ignoring float noise: a fractional token count (tokens are
    refilled continuously) can leave 54.000000000000007 where the exact figure is 54."""
    return max(0, math.ceil(seconds - 1e-9))


def seconds_until_token(tokens: float, capacity: int) -> float:
    """How long until a bucket holding ``tokens`` has one to give."""
    return max(0.0, (1.0 - tokens) * WINDOW_S / capacity)


def limit_headers(d: Decision, policy: str = "key") -> dict[str, str]:
    """The headers every keyed response carries: the X-RateLimit trio and the IETF draft pair
    (draft-ietf-httpapi-ratelimit-headers: ``RateLimit-Policy`` and ``RateLimit``)."""
    headers = {
        "X-RateLimit-Limit": str(d.limit),
        "X-RateLimit-Remaining": str(d.remaining),
        "X-RateLimit-Reset": str(d.reset_s),
        "RateLimit-Policy": f'"{policy}";q={d.limit};w={int(WINDOW_S)}',
        "RateLimit": f'"{policy}";r={d.remaining};t={d.reset_s}',
    }
    if not d.allowed:
        headers["Retry-After"] = str(d.retry_after_s)
    return headers
