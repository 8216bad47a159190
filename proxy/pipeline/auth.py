"""Access stage: the API key is identified, the tenant's status applied, then the key authorised
(CONTRACT §3 statuses, §5 keys).

Identifying comes first so that everything after it knows whose request this is: on a platform
domain the key decides the tenant (§3 rule 3), so the status applied is the key's tenant's, and
every refusal from here on, by status or of the key itself (revoked, expired, IP, scope, tenant
mismatch), is audited with the key's id and that tenant (§9). Identifying refuses nothing: the
precedence of the answers stays status first (a suspended tenant is 403 whatever key is sent),
then a missing or invalid key, then what the key may not do.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from aiohttp import web

from proxy.context import RequestContext
from proxy.core.access import admit
from proxy.core.apikeys import ApiKey, find_match, parse_key, presented_key, required_scope
from proxy.core.tenancy import Tenant, check_status
from proxy.stores.base import KeyStore, Missing, TenantStore, UsageSink
from proxy.telemetry import Telemetry


async def key_tenant(
    tenants: TenantStore, key: ApiKey, tenant: Tenant, via_platform: bool
) -> Tenant | None:
    """The request's tenant once ``key`` is identified: on a platform domain the key's own
    (CONTRACT §3 rule 3), elsewhere the Host's; None when the key's tenant was deleted (its
    keys are gone too)."""
    if via_platform and key.tenant_id != tenant.id:
        return await tenants.by_id(key.tenant_id)
    return tenant


def auth_stage(
    keys: KeyStore,
    tenants: TenantStore,
    usage: UsageSink,
    clock: Callable[[], datetime],
    telemetry: Telemetry,
) -> Callable[[web.Request, RequestContext], Awaitable[None]]:
    """The step of a route whose ``auth`` is "api_key" or "optional" (``open_stage`` is the
    step of one with "none")."""

    async def identify(ctx: RequestContext, token: str) -> ApiKey | None:
        """The key row whose prefix and hash match ``token``, made the request's key (and on a
        platform domain its tenant the request's tenant); ``None`` for no such key."""
        parsed = parse_key(token)
        if parsed is None:
            return None
        rows = keys.cached_keys(parsed.prefix)
        if isinstance(rows, Missing):  # only a cache miss waits
            rows = await keys.by_prefix(parsed.prefix)
        key = find_match(parsed.hash, rows)
        if key is None:
            return None
        assert ctx.tenant is not None  # the tenant stage ran
        owner = await key_tenant(tenants, key, ctx.tenant, ctx.via_platform)
        if owner is None:
            return None
        ctx.tenant, ctx.api_key = owner, key
        return key

    async def auth(request: web.Request, ctx: RequestContext) -> None:
        route, host_tenant = ctx.route, ctx.tenant
        assert route is not None and host_tenant is not None  # earlier stages ran
        headers = request.headers
        token = presented_key(headers.get("Authorization"), headers.get("X-API-Key"))
        if token is None:
            admit(
                host_tenant,
                route.auth,
                presented=False,
                key=None,
                now=clock(),
                client_ip=ctx.client_ip,
                request_tenant_id=host_tenant.id,
                scope=None,
            )
            return
        with telemetry.span("edge.auth") as span:
            key = await identify(ctx, token)
            if span is not None and key is not None:  # the key's id, never the key
                span.set_attribute("flatrender.api_key_id", key.id)
            now = clock()
            tenant = ctx.tenant  # on a platform domain, the key's tenant once identified
            assert tenant is not None
            admit(
                tenant,
                route.auth,
                presented=True,
                key=key,
                now=now,
                client_ip=ctx.client_ip,
                # On a platform domain the key decides the tenant; elsewhere the Host does.
                request_tenant_id=None if ctx.via_platform else host_tenant.id,
                scope=required_scope(route.scopes, request.method),
            )
        assert key is not None  # admitted
        usage.record(key.id, now, ctx.client_ip or None)

    return auth


def open_stage(
    clock: Callable[[], datetime],
) -> Callable[[web.Request, RequestContext], Awaitable[None]]:
    """The access step of a route with ``auth = "none"``: no key is read, the tenant's status
    still applies."""

    async def open_access(_request: web.Request, ctx: RequestContext) -> None:
        assert ctx.tenant is not None  # the tenant stage ran
        check_status(ctx.tenant, clock())

    return open_access
