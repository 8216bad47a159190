"""Monthly render quota (CONTRACT §13): calendar-month math in UTC, the admission rule, the
``RateLimit`` items of draft-ietf-httpapi-ratelimit-headers, and the fail-open share.

The quota period is the calendar month in UTC (not 30 days, not from the first request): it
starts at 00:00:00 UTC on the 1st and ends when the next month starts. The Redis script in
``stores.quota`` applies ``admits`` with the same figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime

POLICY = "renders"


def month_start(now: datetime) -> datetime:
    """00:00:00 UTC on the 1st of ``now``'s UTC month."""
    at = now.astimezone(UTC)
    return datetime(at.year, at.month, 1, tzinfo=UTC)


def next_month_start(now: datetime) -> datetime:
    at = now.astimezone(UTC)
    if at.month == 12:
        return datetime(at.year + 1, 1, 1, tzinfo=UTC)
    return datetime(at.year, at.month + 1, 1, tzinfo=UTC)


def month_id(now: datetime) -> str:
    """``YYYY-MM`` of the UTC month: names the month's counter."""
    at = now.astimezone(UTC)
    return f"{at.year:04d}-{at.month:02d}"


def month_start_of(month: str) -> datetime:
    """00:00:00 UTC on the 1st of the month ``month_id`` names (``YYYY-MM``)."""
    year, number = month.split("-")
    return datetime(int(year), int(number), 1, tzinfo=UTC)


def first_day(now: datetime) -> date:
    return month_start(now).date()


def seconds_until_next_month(now: datetime) -> int:
    """Whole seconds until the next UTC month starts, rounded up and at least 1: a client that
    waits that long (``Retry-After``, RFC 9110 §10.2.3) is in the new month."""
    left = (next_month_start(now) - now).total_seconds()
    return max(1, math.ceil(left))


def seconds_in_month(now: datetime) -> int:
    """The length of ``now``'s UTC month in seconds (the policy's window ``w``)."""
    return int((next_month_start(now) - month_start(now)).total_seconds())


def applicable_quota(method: str, monthly_render_qty: int | None) -> int | None:
    """The quota a request on a metered route counts against: POSTs create renders, other
    methods are neither counted nor refused; None is unlimited, and a negative figure (the
    column allows one) admits none, as 0 does."""
    if method != "POST" or monthly_render_qty is None:
        return None
    return max(0, monthly_render_qty)


def admits(quota: int, count: int, reserved: int) -> bool:
    """Admission: the month's count plus the units reserved and not yet answered stays below
    the quota after this one (0 admits none)."""
    return count + reserved < quota


def remaining(quota: int, count: int, reserved: int) -> int:
    return max(0, quota - count - reserved)


@dataclass(frozen=True, slots=True)
class QuotaItems:
    """The ``"renders"`` members of ``RateLimit-Policy`` and ``RateLimit``."""

    policy: str
    limit: str


def quota_items(quota: int, left: int, now: datetime) -> QuotaItems:
    """``"renders";q=<quota>;w=<seconds in this month>`` and
    ``"renders";r=<left>;t=<seconds until the month ends>`` (draft-ietf-httpapi-ratelimit-headers:
    a quota policy item, and the service limit item that names it)."""
    return QuotaItems(
        policy=f'"{POLICY}";q={quota};w={seconds_in_month(now)}',
        limit=f'"{POLICY}";r={left};t={seconds_until_next_month(now)}',
    )


def outage_share(last_remaining: int, expected_instances: int) -> int:
    """Fail-open admissions one process may make while the shared counter is unreachable: it
    admits while its own count stays below ``remainder / expected_instances`` (CONTRACT §13),
    compared exactly as ``mine * instances < remainder``: as many units as satisfy it."""
    instances = max(1, expected_instances)
    return (max(0, last_remaining) + instances - 1) // instances
