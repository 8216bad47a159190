"""proxy.core.check_schedule: when a custom-domain challenge is checked next (CONTRACT §12)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from proxy.core.check_schedule import delay_after, next_check_at

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("checks", "delay_s"),
    [
        (0, 0.0),  # at once after `domains add`
        (1, 60.0),  # 60 s after the first check
        (2, 90.0),  # 90 s after the second
        (3, 135.0),
        (4, 202.5),
        (5, 303.75),
        (9, 60 * 1.5**8),  # 1,537.7 s: still under the cap
        (10, 60 * 1.5**9),  # 2,306.6 s
        (11, 60 * 1.5**10),  # 3,459.9 s: the last one under the cap
        (12, 3600.0),  # 5,189.9 s capped to an hour
        (100, 3600.0),
        (10_000, 3600.0),  # no float overflow for a row checked for ever
    ],
)
def test_delay_after_the_nth_check(checks: int, delay_s: float) -> None:
    assert delay_after(checks) == pytest.approx(delay_s)


def test_the_delay_never_exceeds_an_hour_and_never_shrinks() -> None:
    delays = [delay_after(n) for n in range(0, 200)]
    assert max(delays) == 3600.0
    assert delays == sorted(delays)


@pytest.mark.parametrize(("checks", "after_s"), [(0, 0), (1, 60), (2, 90), (3, 135), (50, 3600)])
def test_next_check_at_counts_from_the_check(checks: int, after_s: float) -> None:
    assert next_check_at(T0, checks) == T0 + timedelta(seconds=after_s)
