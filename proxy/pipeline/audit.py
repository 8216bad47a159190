"""Audit stage: one row per request on an ``audit = true`` route, rejected ones included
(CONTRACT §9). It wraps auth, rate limiting and forwarding so it sees their refusals; the row is
handed to the sink without waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.audit.record import AuditRecord
from proxy.context import CTX
from proxy.errors import ProxyError
from proxy.stores.base import AuditSink

CLIENT_CLOSED = 499  # nginx's code for a client that went away before the answer was complete


def audit_stage(sink: AuditSink, clock: Callable[[], datetime]) -> Middleware:
    @web.middleware
    async def audit(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = request[CTX]
        assert ctx.route is not None and ctx.tenant is not None  # earlier stages ran
        if not ctx.route.audit:
            return await handler(request)
        created_at = clock()
        status: int = 500
        error: str | None = "internal_error"
        try:
            response = await handler(request)
            status, error = response.status, None
            return response
        except ProxyError as e:
            status, error = e.status, e.code
            raise
        except (ConnectionResetError, asyncio.CancelledError):
            status, error = CLIENT_CLOSED, "client_closed_request"
            raise
        finally:
            loop_now = asyncio.get_running_loop().time()
            sink.submit(
                AuditRecord(
                    created_at=created_at,
                    tenant_id=ctx.tenant.id,  # after auth: on a platform domain, the key's
                    api_key_id=ctx.api_key.id if ctx.api_key else None,
                    method=request.method,
                    path=ctx.path,
                    status_code=status,
                    duration_ms=int((loop_now - ctx.started) * 1000),
                    request_id=ctx.request_id,
                    ip_address=ctx.client_ip or None,
                    user_agent=request.headers.get("User-Agent"),
                    error_message=error,
                    render_started=ctx.render_started,
                )
            )

    return audit
