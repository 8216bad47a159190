"""Tenant stage (CONTRACT §3): resolve the Host to a tenant.

Its status is applied later, by the access stage (``pipeline.auth``), so that CORS decorates
even a suspended tenant's refusal (a browser app must be able to read *why* it was refused),
the refusal is audited, and on a platform domain the status applied is the key's tenant's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from proxy.context import RequestContext
from proxy.core.hosts import classify_host
from proxy.core.tenancy import DEFAULT_TENANT_ID, Tenant
from proxy.errors import DomainNotVerified, UnknownHost
from proxy.stores.base import TenantStore
from proxy.telemetry import Telemetry


async def resolve_tenant(
    store: TenantStore, host: str, platform_domains: tuple[str, ...]
) -> tuple[Tenant, bool]:
    """The contract's order: verified custom domain, then ``<slug>.<platform>``, then apex.

    A platform name is looked up only by slug or as the apex: a tenant row whose
    ``custom_domain`` claims one (another's slug host, the apex) is never consulted, so it can
    neither take that host nor block it with 421. Returns the tenant and whether the host was
    a platform domain itself.
    """
    match = classify_host(host, platform_domains)
    tenant: Tenant | None = None
    if match.kind == "other":
        tenant = await store.by_custom_domain(host)
        if tenant is not None and not tenant.domain_verified:
            raise DomainNotVerified()
    elif match.kind == "slug":
        tenant = await store.by_slug(match.slug)
    elif match.kind == "platform":
        tenant = await store.by_id(DEFAULT_TENANT_ID)
    if tenant is None:
        raise UnknownHost()
    return tenant, match.kind == "platform"


def tenant_stage(
    store: TenantStore, platform_domains: tuple[str, ...], telemetry: Telemetry
) -> Callable[[RequestContext], Awaitable[None]]:
    async def tenant(ctx: RequestContext) -> None:
        with telemetry.span("edge.tenant") as span:
            ctx.tenant, ctx.via_platform = await resolve_tenant(store, ctx.host, platform_domains)
            if span is not None:
                span.set_attribute("flatrender.tenant_id", ctx.tenant.id)

    return tenant
