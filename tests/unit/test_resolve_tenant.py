"""pipeline.tenant.resolve_tenant over the in-memory store (embedded mode): rows that claim
platform names as their custom domain change nothing (CONTRACT §3). The same rules against
real Postgres: tests/e2e/test_tenant_trust_postgres.py."""

from __future__ import annotations

import pytest

from proxy.core.tenancy import DEFAULT_TENANT_ID, Tenant
from proxy.errors import DomainNotVerified, ProxyError, UnknownHost
from proxy.pipeline.tenant import resolve_tenant
from proxy.stores.memory import MemoryTenantStore

PLATFORM = ("eu.flatrender.test", "flatrender.test")
STORE = MemoryTenantStore(
    [
        Tenant(DEFAULT_TENANT_ID, "flatrender", "Active"),
        Tenant("acme", "acme", "Active", "videos.acme.test", domain_verified=True),
        Tenant("eu", "eu", "Active"),
        # hostile rows: each claims a platform name as its custom domain
        Tenant("evil1", "evil1", "Active", "acme.flatrender.test", domain_verified=True),
        Tenant("evil2", "evil2", "Active", "flatrender.test", domain_verified=False),
        Tenant("evil3", "evil3", "Active", "eu.flatrender.test", domain_verified=True),
        Tenant("evil4", "evil4", "Active", "www.acme.flatrender.test", domain_verified=True),
        Tenant("pending", "pending", "Active", "videos.pending.test", domain_verified=False),
    ]
)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("acme.flatrender.test", ("acme", False)),  # not evil1's, though it claims it verified
        ("flatrender.test", (DEFAULT_TENANT_ID, True)),  # not blocked by evil2's unverified claim
        ("eu.flatrender.test", (DEFAULT_TENANT_ID, True)),  # listed itself: an apex, not slug eu
        ("eu.eu.flatrender.test", ("eu", False)),
        ("www.acme.flatrender.test", UnknownHost),  # reserved, whoever claims it
        ("videos.acme.test", ("acme", False)),  # custom domains still work
        ("videos.pending.test", DomainNotVerified),
        ("nobody.example", UnknownHost),
    ],
)
async def test_platform_names_resolve_only_by_slug_or_apex(
    host: str, expected: tuple[str, bool] | type[ProxyError]
) -> None:
    for platform in (PLATFORM, PLATFORM[::-1]):
        if isinstance(expected, tuple):
            tenant, via_platform = await resolve_tenant(STORE, host, platform)
            assert (tenant.id, via_platform) == expected
        else:
            with pytest.raises(expected):
                await resolve_tenant(STORE, host, platform)
