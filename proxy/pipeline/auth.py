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


def auth_stage(
    keys: KeyStore, tenants: TenantStore, usage: UsageSink, clock: Callable[[], datetime]
) -> Middleware:
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = request[CTX]
        route = ctx.route
        assert route is not None and ctx.tenant is not None  # earlier stages ran
        if route.auth == "none":
            return await handler(request)
        headers = request.headers
        token = presented_key(headers.get("Authorization"), headers.get("X-API-Key"))
        if token is None:
            if route.auth == "api_key":
                raise MissingApiKey()
            return await handler(request)
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
            request_tenant_id=None if ctx.via_platform else ctx.tenant.id,
            scope=required_scope(route.scopes, request.method),
        )
        if ctx.via_platform and key.tenant_id != ctx.tenant.id:
            owner = await tenants.by_id(key.tenant_id)
            if owner is None:
                raise InvalidApiKey()  # the key's tenant was deleted
            check_status(owner, now)
            ctx.tenant = owner
        ctx.api_key = key
        usage.record(key.id, now, ctx.client_ip or None)
        return await handler(request)

    return auth
