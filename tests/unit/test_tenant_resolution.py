"""pipeline.tenant: the contract's resolution order (CONTRACT §3), and a cache hit answered
without an await while a miss still loads."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from proxy.context import RequestContext
from proxy.core.tenancy import DEFAULT_TENANT_ID, Tenant
from proxy.errors import DomainNotVerified, UnknownHost
from proxy.pipeline.tenant import TenantStage, resolve_tenant
from proxy.settings import TelemetrySettings
from proxy.stores.base import MISSING, Missing, TenantKind
from proxy.stores.memory import MemoryTenantStore
from proxy.telemetry import Telemetry

PLATFORM = ("flatrender.test",)
ACME = Tenant(
    id="t-acme",
    slug="acme",
    status="Active",
    custom_domain="videos.acme.test",
    domain_verified=True,
)
PENDING = Tenant(id="t-new", slug="new", status="Active", custom_domain="new.example")
DEFAULT = Tenant(id=DEFAULT_TENANT_ID, slug="default", status="Active")
TENANTS = (ACME, PENDING, DEFAULT)


class ColdStore:
    """A store with nothing at hand: every answer needs a load, which it counts."""

    def __init__(self, tenants: Sequence[Tenant]) -> None:
        self.inner = MemoryTenantStore(tenants)
        self.loads = 0

    def cached_tenant(self, kind: TenantKind, value: str) -> Tenant | Missing | None:
        return MISSING

    async def by_custom_domain(self, host: str) -> Tenant | None:
        self.loads += 1
        return await self.inner.by_custom_domain(host)

    async def by_slug(self, slug: str) -> Tenant | None:
        self.loads += 1
        return await self.inner.by_slug(slug)

    async def by_id(self, tenant_id: str) -> Tenant | None:
        self.loads += 1
        return await self.inner.by_id(tenant_id)


CASES = [
    ("videos.acme.test", ACME, False),  # a verified custom domain
    ("acme.flatrender.test", ACME, False),  # <slug>.<platform>
    ("flatrender.test", DEFAULT, True),  # the apex: the default tenant, on the platform
]
REFUSED = [
    ("new.example", DomainNotVerified),
    ("elsewhere.example", UnknownHost),
    ("nobody.flatrender.test", UnknownHost),
]


def _stage(store: object) -> TenantStage:
    return TenantStage(store, PLATFORM, Telemetry(TelemetrySettings(access_log=False)))  # type: ignore[arg-type]


@pytest.mark.parametrize(("host", "tenant", "via_platform"), CASES)
async def test_a_hit_is_resolved_without_an_await(
    host: str, tenant: Tenant, via_platform: bool
) -> None:
    ctx = RequestContext(request_id="r", started=0.0, host=host)
    assert _stage(MemoryTenantStore(TENANTS)).known(ctx)  # a plain call: nothing awaited
    assert (ctx.tenant, ctx.via_platform) == (tenant, via_platform)


@pytest.mark.parametrize(("host", "tenant", "via_platform"), CASES)
async def test_a_miss_is_loaded_to_the_same_answer(
    host: str, tenant: Tenant, via_platform: bool
) -> None:
    store = ColdStore(TENANTS)
    ctx = RequestContext(request_id="r", started=0.0, host=host)
    stage = _stage(store)
    assert not stage.known(ctx) and store.loads == 0 and ctx.tenant is None
    await stage.load(ctx)
    assert (ctx.tenant, ctx.via_platform, store.loads) == (tenant, via_platform, 1)


@pytest.mark.parametrize(("host", "error"), REFUSED)
async def test_refusals_are_the_same_either_way(host: str, error: type[Exception]) -> None:
    ctx = RequestContext(request_id="r", started=0.0, host=host)
    with pytest.raises(error):
        _stage(MemoryTenantStore(TENANTS)).known(ctx)
    with pytest.raises(error):
        await resolve_tenant(ColdStore(TENANTS), host, PLATFORM)
