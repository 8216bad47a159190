"""proxy.core.bucket: token-bucket invariants (CONTRACT §6), as hypothesis properties.

The Lua script in ``stores.redis`` is checked against ``take`` step by step in
``tests/e2e/test_ratelimit_redis.py::test_lua_script_and_pure_function_agree``; these properties
therefore hold for the Redis limiter too.

Times are drawn around two bases: 0 (a monotonic clock, the in-process store) and 1.7e9 (Redis's
``TIME``, Unix seconds), where a float has about 0.2 µs of resolution: the properties must hold
with that rounding, not only with small numbers.
"""

from __future__ import annotations

import itertools
import math
import re
from fractions import Fraction

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from proxy.core.bucket import (
    WINDOW_S,
    BucketState,
    Decision,
    decide,
    limit_headers,
    nothing_allowed,
    peek,
    seconds_until_token,
    take,
)

# Realistic limits: 1 rpm (a token a minute) up to a million (16,667 a second).
_capacity = st.integers(min_value=1, max_value=1_000_000)
_base = st.sampled_from([0.0, 1_700_000_000.0])
# Gaps between calls: bursts (0), sub-millisecond, seconds, past a whole window.
_gap = st.one_of(
    st.just(0.0),
    st.floats(min_value=0.0, max_value=0.001),
    st.floats(min_value=0.0, max_value=5.0),
    st.floats(min_value=0.0, max_value=3 * WINDOW_S),
)
# A clock may also step backwards (NTP on Redis's host; a VM restored from a snapshot).
_step = st.one_of(_gap, _gap.map(lambda g: -g))


def _refilled(state: BucketState | None, capacity: int, now: float) -> float:
    """The tokens ``take`` sees before it decides: the documented refill rule."""
    if state is None:
        return float(capacity)
    rate = capacity / WINDOW_S
    return min(float(capacity), state.tokens + max(0.0, now - state.updated) * rate)


def _run(
    capacity: int, base: float, steps: list[float]
) -> list[tuple[float, BucketState, Decision]]:
    """Calls at ``base`` then each step further on; (time, state after, decision) per call."""
    out = []
    state: BucketState | None = None
    now = base
    for i, step in enumerate([0.0, *steps]):
        now = now + step if i else base
        state, decision = take(state, capacity, now)
        out.append((now, state, decision))
    return out


# --------------------------------------------------------------------------- tables


def test_a_new_bucket_admits_exactly_capacity_at_one_instant() -> None:
    state: BucketState | None = None
    admitted = 0
    for _ in range(10):
        state, d = take(state, 7, 100.0)
        admitted += d.allowed
    assert admitted == 7
    assert state is not None and state.tokens == 0.0


def test_one_token_comes_back_after_sixty_over_rpm_seconds() -> None:
    state, _ = take(None, 60, 0.0)  # 60 rpm: one token a second
    for _ in range(59):
        state, _ = take(state, 60, 0.0)
    state, d = take(state, 60, 0.5)
    assert not d.allowed and d.retry_after_s == 1 and d.remaining == 0
    state, d = take(state, 60, 1.0)
    assert d.allowed


def test_headers_of_a_rejection() -> None:
    d = decide(False, 0.25, 60)
    assert limit_headers(d) == {
        "X-RateLimit-Limit": "60",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "60",  # 59.75 tokens at one a second
        "RateLimit-Policy": '"key";q=60;w=60',
        "RateLimit": '"key";r=0;t=60',
        "Retry-After": "1",
    }


def test_headers_name_the_policy() -> None:
    headers = limit_headers(decide(True, 4.0, 5), policy="ip")
    assert headers["RateLimit-Policy"] == '"ip";q=5;w=60'
    assert headers["RateLimit"] == '"ip";r=4;t=12'
    assert "Retry-After" not in headers


# --------------------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(_capacity, _base, st.lists(_step, max_size=60))
def test_tokens_stay_between_zero_and_capacity(
    capacity: int, base: float, steps: list[float]
) -> None:
    for _now, state, decision in _run(capacity, base, steps):
        assert 0.0 <= state.tokens <= capacity
        assert 0 <= decision.remaining <= capacity
        assert decision.limit == capacity


@settings(max_examples=300, deadline=None)
@given(_capacity, _base, st.lists(_step, max_size=60))
def test_a_rejection_takes_nothing_and_an_admission_takes_exactly_one(
    capacity: int, base: float, steps: list[float]
) -> None:
    state: BucketState | None = None
    now = base
    for i, step in enumerate([0.0, *steps]):
        now = now + step if i else base
        before = _refilled(state, capacity, now)
        state, decision = take(state, capacity, now)
        assert state.updated == now
        if decision.allowed:
            assert before >= 1.0
            assert state.tokens == before - 1.0
        else:
            # Nothing taken: what is left is the refill alone, and it is under one token.
            assert before < 1.0
            assert state.tokens == before


@settings(max_examples=300, deadline=None)
@given(_capacity, _base, st.lists(_gap, min_size=1, max_size=120))
def test_admissions_never_exceed_capacity_plus_refill(
    capacity: int, base: float, gaps: list[float]
) -> None:
    """Over any calls at non-decreasing times: admitted <= capacity + elapsed * rate (+1 for
    float rounding over many small refills)."""
    calls = _run(capacity, base, gaps)
    admitted = sum(d.allowed for _, _, d in calls)
    elapsed = calls[-1][0] - calls[0][0]
    assert admitted <= capacity + elapsed * capacity / WINDOW_S + 1


@settings(max_examples=200, deadline=None)
@given(_capacity, _base, st.lists(_step, min_size=1, max_size=120))
def test_refill_is_credited_only_for_forward_clock_movement(
    capacity: int, base: float, steps: list[float]
) -> None:
    """With a clock that also steps back, admissions are bounded by the time the clock moved
    *forward* in total. Note what this allows: ``take`` stores the (earlier) time of a call
    after a backward step, so the same interval is credited again when the clock moves forward
    over it: a step back of d seconds lets up to min(capacity, d * rate) extra requests through
    once. The alternative (keep the latest time seen) would freeze the bucket until the clock
    caught up, rejecting every request for d seconds; the limiter prefers to err towards
    serving."""
    calls = _run(capacity, base, steps)
    admitted = sum(d.allowed for _, _, d in calls)
    times = [t for t, _, _ in calls]
    forward = sum(max(0.0, b - a) for a, b in itertools.pairwise(times))
    assert admitted <= capacity + forward * capacity / WINDOW_S + 1


@settings(max_examples=300, deadline=None)
@given(_capacity, _base, st.lists(_gap, max_size=30), st.floats(min_value=0.0, max_value=1e6))
def test_a_clock_stepping_backwards_never_drains(
    capacity: int, base: float, gaps: list[float], back: float
) -> None:
    calls = _run(capacity, base, gaps)
    now, state, _ = calls[-1]
    earlier = now - back
    after, decision = take(state, capacity, earlier)
    # No refill for negative time, and nothing lost but the token an admission takes: the
    # same decision as a call at the last time seen.
    assert after.tokens == state.tokens - (1.0 if decision.allowed else 0.0)
    _, same_time = take(state, capacity, now)
    assert decision == same_time


# A client cannot arrive at the very float instant of ``now + Retry-After``: Redis's clock in
# Unix seconds has 0.24 µs of resolution, so "exactly then" is checked a millisecond after.
_SLACK_S = 0.001


@settings(max_examples=500, deadline=None)
@example(capacity=7, base=0.0, gaps=[0.0] * 7)
@example(capacity=11, base=0.0, gaps=[])  # 11 rpm once reported Retry-After/Reset off by one
@example(capacity=1, base=0.0, gaps=[0.0007691913224420873, 68.0])
@example(capacity=1_000_000, base=1_700_000_000.0, gaps=[0.0] * 3)
@given(_capacity, _base, st.lists(_gap, max_size=40))
def test_retry_after_is_at_least_one_and_honest(
    capacity: int, base: float, gaps: list[float]
) -> None:
    """Empty the bucket at the last instant until a call is rejected; then Retry-After is
    >= 1, a call that waits that long is admitted, and (when it is over a second) waiting a
    second less is not enough: the header neither lies nor over-asks."""
    calls = _run(capacity, base, gaps)
    now, state, decision = calls[-1]
    # The floor(tokens) admissions that calls at ``now`` would make, in one step (subtracting
    # 1.0 from these floats is exact, so this is the state they would leave).
    state = BucketState(state.tokens - math.floor(state.tokens), now)
    state, decision = take(state, capacity, now)
    assert not decision.allowed
    assert decision.retry_after_s >= 1
    assert decision.retry_after_s <= WINDOW_S  # one token never takes longer than a window
    _, later = take(state, capacity, now + decision.retry_after_s + _SLACK_S)
    assert later.allowed
    if decision.retry_after_s > 1:
        _, sooner = take(state, capacity, now + decision.retry_after_s - 1 - _SLACK_S)
        assert not sooner.allowed


@settings(max_examples=300, deadline=None)
@given(_capacity, st.floats(min_value=0.0, max_value=1.0, exclude_max=True), _base)
def test_seconds_until_token_is_exact_enough_for_the_local_shortcut(
    capacity: int, tokens: float, base: float
) -> None:
    """The Redis store refuses locally until ``seconds_until_token`` has passed (never
    granting, only refusing): before then the bucket itself must refuse too, and once it has
    passed the bucket has its token (allowing float rounding of a microsecond)."""
    wait = seconds_until_token(tokens, capacity)
    assert wait > 0.0
    state = BucketState(tokens, base)
    for fraction in (0.0, 0.5, 0.999):
        _, d = take(state, capacity, base + wait * fraction - 1e-6)
        assert not d.allowed, fraction
    _, d = take(state, capacity, base + wait + 1e-6)
    assert d.allowed
    # And the header agrees: Retry-After is this wait rounded up to whole seconds.
    assert decide(False, tokens, capacity).retry_after_s == max(1, math.ceil(wait - 1e-9))


@settings(max_examples=100, deadline=None)
@given(_capacity, st.floats(min_value=1.0, max_value=1e6))
def test_no_wait_while_a_token_is_there(capacity: int, tokens: float) -> None:
    assert seconds_until_token(min(tokens, capacity), capacity) == 0.0


_HEADER_VALUE = re.compile(r"[0-9]+")
_EPS = Fraction(1, 1_000_000)


@settings(max_examples=500, deadline=None)
@given(
    _capacity,
    st.floats(min_value=0.0, max_value=1.0),
    st.booleans(),
    st.sampled_from(["key", "ip"]),
)
def test_headers_agree_with_the_decision(
    capacity: int, fill: float, allowed: bool, policy: str
) -> None:
    tokens = fill * capacity
    assume(tokens >= 0.0 if allowed else tokens < 1.0)  # the tokens *left* by such a call
    d = decide(allowed, tokens, capacity)
    headers = limit_headers(d, policy)
    assert all(v.isascii() for v in headers.values())
    for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
        assert _HEADER_VALUE.fullmatch(headers[name]), headers
    limit = int(headers["X-RateLimit-Limit"])
    remaining = int(headers["X-RateLimit-Remaining"])
    reset = int(headers["X-RateLimit-Reset"])
    assert limit == capacity == d.limit
    assert remaining == d.remaining == math.floor(tokens) and 0 <= remaining <= limit
    # Reset: the seconds until the bucket is full again, rounded up to whole ones (the exact
    # figure in rationals; a microsecond of float rounding either way is allowed).
    full_in = (Fraction(capacity) - Fraction(tokens)) * int(WINDOW_S) / capacity
    assert reset == d.reset_s >= 0
    assert full_in - _EPS <= reset < full_in + 1
    # The IETF draft pair repeats the same figures.
    assert headers["RateLimit-Policy"] == f'"{policy}";q={limit};w=60'
    assert headers["RateLimit"] == f'"{policy}";r={remaining};t={reset}'
    if allowed:
        assert "Retry-After" not in headers and d.retry_after_s == 0
    else:
        assert remaining == 0
        retry_after = int(headers["Retry-After"])
        assert retry_after == d.retry_after_s >= 1
        token_in = (1 - Fraction(tokens)) * int(WINDOW_S) / capacity
        assert token_in - _EPS <= retry_after < max(2, token_in + 1)
        assert retry_after <= max(reset, 1)


@settings(max_examples=200, deadline=None)
@given(_capacity, _base, st.lists(_step, max_size=40))
def test_decisions_of_take_are_decide_of_what_is_left(
    capacity: int, base: float, steps: list[float]
) -> None:
    """The Redis store rebuilds the decision from the script's (allowed, tokens) with
    ``decide``: that must be the very decision ``take`` returned."""
    for _now, state, decision in _run(capacity, base, steps):
        assert decide(decision.allowed, state.tokens, capacity) == decision


def test_whole_tokens_missing_give_exact_seconds() -> None:
    """With k whole tokens missing, Reset is exactly ceil(k * 60 / rpm) and Retry-After of an
    empty bucket exactly ceil(60 / rpm): no second is added by float rounding. (Dividing by the
    rate instead reported Reset 61 for an empty bucket at 11 rpm, and at a tenth of all
    capacities.)"""
    for capacity in [*range(1, 3001), 4941, 600_000, 999_999, 1_000_000]:
        assert decide(True, float(capacity), capacity).reset_s == 0
        assert decide(False, 0.0, capacity).reset_s == WINDOW_S, capacity
        assert decide(False, 0.0, capacity).retry_after_s == max(1, -(-60 // capacity))
        for missing in (1, 7, capacity // 3):
            if 0 < missing <= capacity:
                tokens = float(capacity - missing)
                expected = -(-missing * 60 // capacity)  # ceil in integers
                assert decide(True, tokens, capacity).reset_s == expected, (capacity, missing)


# --------------------------------------------------------------------------- capacity under 1


@pytest.mark.parametrize("capacity", [0, -5])
def test_a_capacity_under_one_admits_nothing(capacity: int) -> None:
    d = nothing_allowed(capacity)
    assert not d.allowed and d.remaining == 0 and d.limit == max(capacity, 0)
    headers = limit_headers(d)
    assert int(headers["Retry-After"]) >= 1
    assert all(v.isascii() and "-" not in v for v in headers.values())


class _StoreThatMustNotBeAsked:
    async def take(self, bucket: str, capacity: int) -> Decision:
        raise AssertionError(f"asked the store for a capacity of {capacity}")

    async def peek(self, bucket: str, capacity: int) -> Decision:
        raise AssertionError(f"asked the store for a capacity of {capacity}")


@pytest.mark.parametrize("shadow", [False, True])
async def test_a_zero_rpm_key_never_reaches_the_bucket_store(shadow: bool) -> None:
    """A key row saying ``rate_limit_rpm = 0`` (the identity schema allows it) once divided by
    zero in the in-process store (500) and failed the Redis script's whole batch, tripping the
    breaker for every tenant (503 for all with failure_mode = "closed"; with "open", the
    fallback admitted the key). The stage now refuses it without asking any store."""
    from aiohttp.test_utils import make_mocked_request

    from proxy.context import CTX, RequestContext
    from proxy.core.apikeys import ApiKey
    from proxy.core.tenancy import Tenant
    from proxy.errors import RateLimited
    from proxy.pipeline.ratelimit import LimitCounters, ratelimit_stage
    from proxy.settings import RatelimitSettings, RouteSettings, TelemetrySettings
    from proxy.telemetry import Telemetry

    tenant = Tenant(id="t", slug="acme", status="Active")
    key = ApiKey("k", "t", "live", "fr_live_abcd", "0" * 64, rate_limit_rpm=0)
    counters = LimitCounters()
    stage = ratelimit_stage(
        _StoreThatMustNotBeAsked(),
        RatelimitSettings(shadow=shadow),
        counters,
        Telemetry(TelemetrySettings(access_log=False)),
    )
    request = make_mocked_request("GET", "/v1/renders")
    ctx = RequestContext(request_id="r", started=0.0, tenant=tenant, api_key=key)
    ctx.route = RouteSettings(prefix="/v1/renders", upstream="u")
    request[CTX] = ctx

    if shadow:  # decided and reported, never rejected
        await stage(request, ctx)
        assert counters.shadow_rejected == 1
    else:
        with pytest.raises(RateLimited):
            await stage(request, ctx)
        assert counters.rejected == 1
    assert ctx.response_headers["X-RateLimit-Limit"] == "0"
    assert ctx.response_headers["Retry-After"] == "60"


# --------------------------------------------------------------------------- peek


@pytest.mark.parametrize(
    ("state", "now", "allowed", "remaining"),
    [
        (None, 0.0, True, 60),  # an absent bucket is full
        (BucketState(0.0, 0.0), 0.0, False, 0),
        (BucketState(0.0, 0.0), 1.0, True, 1),  # a token a second at 60 rpm
        (BucketState(5.5, 10.0), 9.0, True, 5),  # a clock that stepped back drains nothing
        (BucketState(59.0, 0.0), 600.0, True, 60),  # never above capacity
    ],
)
def test_peek_reports_what_take_would_find_and_takes_nothing(
    state: BucketState | None, now: float, allowed: bool, remaining: int
) -> None:
    d = peek(state, 60, now)
    assert (d.allowed, d.remaining) == (allowed, remaining)
    _, taken = take(state, 60, now)
    assert taken.allowed == allowed
    assert taken.remaining == (remaining - 1 if allowed else remaining)
