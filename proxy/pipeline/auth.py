"""Authentication stage: API key → key row → authorisation (CONTRACT §5)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.context import CTX
from proxy.core.apikeys import authorize, find_match, parse_key, presented_key, required_scope
from proxy.core.tenancy import check_status
from proxy.errors import InvalidApiKey, MissingApiKey
from proxy.stores.base import KeyStore, TenantStore, UsageSink
from proxy.telemetry import Telemetry


def auth_stage(
    keys: KeyStore,
    tenants: TenantStore,
    usage: UsageSink,
    clock: Callable[[], datetime],
    telemetry: Telemetry,
) -> Middleware:
    async def authenticate(request: web.Request, token: str) -> None:
        ctx = request[CTX]
        route, tenant = ctx.route, ctx.tenant
        assert route is not None and tenant is not None  # earlier stages ran
        parsed = parse_key(token)
        key = find_match(parsed.hash, await keys.by_prefix(parsed.prefix)) if parsed else None
        if key is None:
            raise InvalidApiKey()  # unknown and wrong keys look the same to the caller
        now = clock()
        authorize(
            key,
            now=now,
            client_ip=ctx.client_ip,
            # On a platform domain the key decides the tenant; elsewhere the Host does.
            request_tenant_id=None if ctx.via_platform else tenant.id,
            scope=required_scope(route.scopes, request.method),
        )
        if ctx.via_platform and key.tenant_id != tenant.id:
            owner = await tenants.by_id(key.tenant_id)
            if owner is None:
                raise InvalidApiKey()  # the key's tenant was deleted
            check_status(owner, now)
            ctx.tenant = owner
        ctx.api_key = key
        usage.record(key.id, now, ctx.client_ip or None)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request[CTX].route
        assert route is not None  # the route stage ran
        if route.auth == "none":
            return await handler(request)
        headers = request.headers
        token = presented_key(headers.get("Authorization"), headers.get("X-API-Key"))
        if token is None:
            if route.auth == "api_key":
                raise MissingApiKey()
            return await handler(request)
        with telemetry.span("edge.auth") as span:
            await authenticate(request, token)
            if span is not None:  # the key's id, never the key
                span.set_attribute("flatrender.api_key_id", request[CTX].api_key.id)  # type: ignore[union-attr]
        return await handler(request)

    return auth
