"""``core.access.admit``: which refusal of the access step comes first (CONTRACT §3, §5)."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import pytest

from proxy.core.access import admit
from proxy.core.apikeys import ApiKey
from proxy.core.tenancy import Tenant
from proxy.errors import ProxyError

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
ACTIVE = Tenant(id="t1", slug="acme", status="Active")
SUSPENDED = Tenant(id="t1", slug="acme", status="Suspended")
CANCELLED = Tenant(id="t1", slug="acme", status="Cancelled")
OVER_TRIAL = Tenant(id="t1", slug="acme", status="Trial", trial_ends_at=NOW - timedelta(days=1))
IN_TRIAL = Tenant(id="t1", slug="acme", status="Trial", trial_ends_at=NOW + timedelta(days=1))


def key(**fields: object) -> ApiKey:
    base: dict[str, object] = {
        "id": "k1",
        "tenant_id": "t1",
        "environment": "live",
        "key_prefix": "fr_live_abcd",
        "key_hash": "0" * 64,
        "scopes": ("renders:*",),
    }
    return ApiKey(**{**base, **fields})  # type: ignore[arg-type]


GOOD = key()
REVOKED = key(revoked_at=NOW - timedelta(hours=1))
INACTIVE = key(is_active=False)
EXPIRED = key(expires_at=NOW)
OTHERS = key(tenant_id="t2")
FENCED = key(allowed_ips=(ipaddress.ip_network("10.0.0.0/8"),))

# tenant, auth, presented, key, scope, request tenant -> the refusal's code (None: admitted)
CASES = [
    (ACTIVE, "api_key", True, GOOD, "renders:read", "t1", None),
    (IN_TRIAL, "api_key", True, GOOD, "renders:read", "t1", None),
    (OVER_TRIAL, "api_key", True, GOOD, "renders:read", "t1", "trial_expired"),
    (SUSPENDED, "api_key", True, GOOD, None, "t1", "tenant_suspended"),
    (CANCELLED, "none", False, None, None, "t1", "tenant_cancelled"),
    # the status comes before a missing or invalid key and before the key's own refusals
    (SUSPENDED, "api_key", False, None, None, "t1", "tenant_suspended"),
    (SUSPENDED, "api_key", True, None, None, "t1", "tenant_suspended"),
    (SUSPENDED, "api_key", True, REVOKED, None, "t1", "tenant_suspended"),
    (ACTIVE, "api_key", False, None, None, "t1", "missing_api_key"),
    (ACTIVE, "optional", False, None, None, "t1", None),
    (ACTIVE, "none", True, None, None, "t1", None),  # "none" reads no key at all
    (ACTIVE, "optional", True, None, None, "t1", "invalid_api_key"),
    (ACTIVE, "api_key", True, None, None, "t1", "invalid_api_key"),
    (ACTIVE, "api_key", True, REVOKED, None, "t1", "api_key_revoked"),
    (ACTIVE, "api_key", True, INACTIVE, None, "t1", "api_key_revoked"),
    (ACTIVE, "api_key", True, EXPIRED, None, "t1", "api_key_expired"),
    (ACTIVE, "api_key", True, OTHERS, None, "t1", "tenant_mismatch"),
    (ACTIVE, "api_key", True, OTHERS, None, None, None),  # platform domain: the key decides
    (ACTIVE, "api_key", True, FENCED, None, "t1", "ip_not_allowed"),
    (ACTIVE, "api_key", True, GOOD, "billing:read", "t1", "insufficient_scope"),
]


@pytest.mark.parametrize(("tenant", "auth", "presented", "row", "scope", "host", "code"), CASES)
def test_the_first_refusal_that_applies(
    tenant: Tenant,
    auth: str,
    presented: bool,
    row: ApiKey | None,
    scope: str | None,
    host: str | None,
    code: str | None,
) -> None:
    try:
        admit(
            tenant,
            auth,
            presented=presented,
            key=row,
            now=NOW,
            client_ip="192.0.2.1",
            request_tenant_id=host,
            scope=scope,
        )
    except ProxyError as e:
        assert e.code == code
    else:
        assert code is None
