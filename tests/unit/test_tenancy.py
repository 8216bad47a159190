"""proxy.core.tenancy.check_status: the status rules of CONTRACT §3."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from proxy.core.tenancy import Tenant, TenantStatus, check_status
from proxy.errors import ProxyError, TenantCancelled, TenantSuspended, TrialExpired

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _tenant(status: TenantStatus, trial_ends_at: datetime | None = None) -> Tenant:
    return Tenant(id="t-1", slug="acme", status=status, trial_ends_at=trial_ends_at)


@pytest.mark.parametrize(
    "tenant",
    [
        _tenant("Active"),
        # an Active tenant's stale trial date means nothing
        _tenant("Active", trial_ends_at=NOW - timedelta(days=30)),
        _tenant("Trial", trial_ends_at=NOW + timedelta(seconds=1)),
        _tenant("Trial", trial_ends_at=NOW + timedelta(days=14)),
        _tenant("Trial"),  # no end date: an open-ended trial
    ],
)
def test_served(tenant: Tenant) -> None:
    check_status(tenant, NOW)  # raises when refused


@pytest.mark.parametrize(
    ("tenant", "error", "status", "code"),
    [
        (_tenant("Trial", trial_ends_at=NOW), TrialExpired, 402, "trial_expired"),
        (
            _tenant("Trial", trial_ends_at=NOW - timedelta(seconds=1)),
            TrialExpired,
            402,
            "trial_expired",
        ),
        (_tenant("Suspended"), TenantSuspended, 403, "tenant_suspended"),
        (
            _tenant("Suspended", trial_ends_at=NOW + timedelta(days=1)),
            TenantSuspended,
            403,
            "tenant_suspended",
        ),
        (_tenant("Cancelled"), TenantCancelled, 410, "tenant_cancelled"),
    ],
)
def test_refused(tenant: Tenant, error: type[ProxyError], status: int, code: str) -> None:
    with pytest.raises(error) as caught:
        check_status(tenant, NOW)
    assert (caught.value.status, caught.value.code) == (status, code)


def test_trial_end_is_compared_as_an_instant_across_offsets() -> None:
    # 13:00+01:00 is 12:00 UTC: the trial ends exactly now.
    ends_cet = datetime.fromisoformat("2026-03-01T13:00:00+01:00")
    assert ends_cet == NOW
    with pytest.raises(TrialExpired):
        check_status(_tenant("Trial", trial_ends_at=ends_cet), NOW)
    check_status(_tenant("Trial", trial_ends_at=ends_cet), NOW - timedelta(microseconds=1))
