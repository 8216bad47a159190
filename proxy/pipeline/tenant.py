"""Tenant stage (CONTRACT §3): resolve the Host to a tenant.

Its status is applied later, by the access stage (``pipeline.auth``), so that CORS decorates
even a suspended tenant's refusal (a browser app must be able to read *why* it was refused),
the refusal is audited, and on a platform domain the status applied is the key's tenant's.
"""

from __future__ import annotations

from proxy.context import RequestContext
from proxy.core.hosts import classify_host
from proxy.core.tenancy import DEFAULT_TENANT_ID, Tenant
from proxy.errors import DomainNotVerified, UnknownHost
from proxy.stores.base import Missing, TenantKind, TenantStore
from proxy.telemetry import Telemetry


def _lookup(host: str, platform_domains: tuple[str, ...]) -> tuple[TenantKind, str] | None:
    """Where the contract's order looks ``host`` up: a custom domain, ``<slug>.<platform>``, or
    the apex (the default tenant); None for a platform name that is neither."""
    match = classify_host(host, platform_domains)
    if match.kind == "other":
        return "domain", host
    if match.kind == "slug":
        return "slug", match.slug
    if match.kind == "platform":
        return "id", DEFAULT_TENANT_ID
    return None


async def _load(store: TenantStore, kind: TenantKind, value: str) -> Tenant | None:
    if kind == "domain":
        return await store.by_custom_domain(value)
    if kind == "slug":
        return await store.by_slug(value)
    return await store.by_id(value)


def _served(tenant: Tenant | None, kind: TenantKind) -> tuple[Tenant, bool]:
    if tenant is None:
        raise UnknownHost()
    if kind == "domain" and not tenant.domain_verified:
        raise DomainNotVerified()
    return tenant, kind == "id"


async def resolve_tenant(
    store: TenantStore, host: str, platform_domains: tuple[str, ...]
) -> tuple[Tenant, bool]:
    """The contract's order: verified custom domain, then ``<slug>.<platform>``, then apex.

    A platform name is looked up only by slug or as the apex: a tenant row whose
    ``custom_domain`` claims one (another's slug host, the apex) is never consulted, so it can
    neither take that host nor block it with 421. Returns the tenant and whether the host was
    a platform domain itself.
    """
    lookup = _lookup(host, platform_domains)
    if lookup is None:
        raise UnknownHost()
    kind, value = lookup
    tenant = store.cached_tenant(kind, value)
    if isinstance(tenant, Missing):  # only a cache miss waits
        tenant = await _load(store, kind, value)
    return _served(tenant, kind)


class TenantStage:
    """``known`` resolves the tenant without waiting when the store has the answer at hand
    (the common case: a cache hit); ``load`` when it must be fetched."""

    __slots__ = ("_platform_domains", "_store", "_telemetry")

    def __init__(
        self, store: TenantStore, platform_domains: tuple[str, ...], telemetry: Telemetry
    ) -> None:
        self._store = store
        self._platform_domains = platform_domains
        self._telemetry = telemetry

    def known(self, ctx: RequestContext) -> bool:
        if self._telemetry.tracer is not None:
            return False  # traced: the lookup gets its span in load()
        lookup = _lookup(ctx.host, self._platform_domains)
        if lookup is None:
            raise UnknownHost()
        tenant = self._store.cached_tenant(*lookup)
        if isinstance(tenant, Missing):
            return False
        ctx.tenant, ctx.via_platform = _served(tenant, lookup[0])
        return True

    async def load(self, ctx: RequestContext) -> None:
        with self._telemetry.span("edge.tenant") as span:
            ctx.tenant, ctx.via_platform = await resolve_tenant(
                self._store, ctx.host, self._platform_domains
            )
            if span is not None:
                span.set_attribute("flatrender.tenant_id", ctx.tenant.id)
