"""Rate-limit stage: one token per keyed request, headers on every keyed answer (CONTRACT §6)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.context import CTX
from proxy.core.bucket import limit_headers
from proxy.errors import RateLimited
from proxy.stores.base import BucketStore


def ratelimit_stage(buckets: BucketStore, shadow: bool) -> Middleware:
    @web.middleware
    async def ratelimit(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = request[CTX]
        key = ctx.api_key
        if key is None:
            return await handler(request)
        decision = await buckets.take(f"key:{key.id}", key.rate_limit_rpm)
        # Headers go on the context so they reach error answers and upstream answers alike.
        ctx.response_headers.update(limit_headers(decision))
        assert ctx.tenant is not None
        if not decision.allowed and not (shadow or ctx.tenant.features.get("ratelimit_shadow")):
            raise RateLimited()
        return await handler(request)

    return ratelimit
