"""Calendar-month math of the render quota (CONTRACT §13), as tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from proxy.core.quota import (
    admits,
    month_id,
    outage_share,
    quota_items,
    remaining,
    seconds_in_month,
    seconds_until_next_month,
)

DAY = 86_400


def at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("now", "retry_after"),
    [
        (at(2026, 1, 1), 31 * DAY),  # the first instant of a month: the whole month
        (at(2026, 1, 31, 23, 59, 59), 1),
        (at(2026, 12, 31, 23, 59, 59), 1),  # December: the next month is next year's January
        (at(2026, 12, 1), 31 * DAY),
        (at(2026, 12, 15, 12), 16 * DAY + 12 * 3600),
        (at(2028, 2, 1), 29 * DAY),  # leap February
        (at(2028, 2, 28, 12), DAY + 12 * 3600),  # the 29th is still to come
        (at(2027, 2, 28, 12), 12 * 3600),  # common February
        (at(2026, 4, 30, 23, 59, 59, 500_000), 1),  # half a second left rounds up to 1
        (at(2026, 4, 30, 23, 59, 58, 1), 2),
        (at(2026, 6, 15, 0, 0, 0, 1), 16 * DAY),  # a microsecond short of 16 days: rounded up
    ],
)
def test_retry_after_reaches_the_next_utc_month(now: datetime, retry_after: int) -> None:
    assert seconds_until_next_month(now) == retry_after
    # Waiting that long lands in the next month, and no earlier second does.
    assert month_id(now + timedelta(seconds=retry_after)) != month_id(now)
    assert month_id(now + timedelta(seconds=retry_after - 1)) == month_id(now)


@pytest.mark.parametrize(
    ("now", "seconds"),
    [
        (at(2026, 1, 10), 31 * DAY),
        (at(2026, 2, 10), 28 * DAY),
        (at(2028, 2, 29, 23), 29 * DAY),  # leap February
        (at(2100, 2, 3), 28 * DAY),  # a century that is not a leap year
        (at(2000, 2, 3), 29 * DAY),  # one that is
        (at(2026, 4, 1), 30 * DAY),
        (at(2026, 12, 31, 23, 59, 59), 31 * DAY),
    ],
)
def test_window_is_the_calendar_month(now: datetime, seconds: int) -> None:
    assert seconds_in_month(now) == seconds


def test_months_are_utc_whatever_the_offset() -> None:
    tehran = timezone(timedelta(hours=3, minutes=30))
    # 02:00 on 1 March in Tehran is still February in UTC.
    now = datetime(2026, 3, 1, 2, 0, tzinfo=tehran)
    assert month_id(now) == "2026-02"
    assert seconds_until_next_month(now) == 3600 * 1 + 30 * 60


@pytest.mark.parametrize(
    ("quota", "count", "reserved", "admitted", "left"),
    [
        (0, 0, 0, False, 0),  # 0 allows none
        (1, 0, 0, True, 1),
        (1, 0, 1, False, 0),  # the one unit is reserved by a request in flight
        (10, 9, 0, True, 1),
        (10, 9, 1, False, 0),
        (10, 12, 0, False, 0),  # over (the quota was lowered): never negative
    ],
)
def test_admission_counts_reservations(
    quota: int, count: int, reserved: int, admitted: bool, left: int
) -> None:
    assert admits(quota, count, reserved) is admitted
    assert remaining(quota, count, reserved) == left


def test_header_items() -> None:
    items = quota_items(1000, 250, at(2028, 2, 28))
    assert items.policy == f'"renders";q=1000;w={29 * DAY}'
    assert items.limit == f'"renders";r=250;t={2 * DAY}'


@pytest.mark.parametrize(
    ("last_remaining", "instances", "share"),
    [
        (100, 1, 100),
        (100, 3, 34),  # 33 * 3 = 99 < 100: a 34th admission is still below 100 / 3
        (99, 3, 33),
        (2, 3, 1),  # 0 * 3 < 2
        (1, 2, 1),
        (10, 4, 3),
        (0, 1, 0),
        (-5, 2, 0),
    ],
)
def test_outage_share(last_remaining: int, instances: int, share: int) -> None:
    assert outage_share(last_remaining, instances) == share


@pytest.mark.parametrize("instances", [1, 2, 3, 7])
@pytest.mark.parametrize("last_remaining", [0, 1, 2, 5, 6, 100])
def test_outage_share_admits_while_own_count_is_below_the_share_of_the_remainder(
    last_remaining: int, instances: int
) -> None:
    share = outage_share(last_remaining, instances)
    assert all(mine * instances < last_remaining for mine in range(share))
    assert not share * instances < last_remaining
