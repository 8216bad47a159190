"""Webhook retry schedule (CONTRACT §11): the delay after failed attempt N, ±10%."""

from __future__ import annotations

import pytest

from proxy.core.schedules import webhook_retry_delay

DEFAULT = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


@pytest.mark.parametrize(
    ("attempt", "status", "unit", "delay"),
    [
        (1, 500, 0.5, 5.0),  # middle of the jitter range: the schedule itself
        (1, 500, 0.0, 4.5),  # -10%
        (1, 500, 0.999999, 5.5),  # just under +10%
        (2, None, 0.5, 300.0),  # a timeout or connection failure: no status
        (3, 302, 0.5, 1800.0),  # a redirect is a failure like any other
        (7, 503, 0.5, 36000.0),  # the last retry
        (8, 503, 0.5, None),  # eight attempts made: none left
        (1, 410, 0.5, None),  # 410 Gone is never retried
        (3, 410, 0.5, None),
        (0, 500, 0.5, None),  # not an attempt number
    ],
)
def test_delay(attempt: int, status: int | None, unit: float, delay: float | None) -> None:
    got = webhook_retry_delay(DEFAULT, attempt, status, unit)
    if delay is None:
        assert got is None
    else:
        assert got == pytest.approx(delay, rel=1e-5)


def test_empty_schedule_means_one_attempt() -> None:
    assert webhook_retry_delay((), 1, 500, 0.5) is None


def test_jitter_stays_within_ten_percent() -> None:
    delays = [webhook_retry_delay((100.0,), 1, 500, u / 100) for u in range(100)]
    assert all(d is not None and 90.0 <= d < 110.0 for d in delays)
