"""Audit stage: one row per request on an ``audit = true`` route of a resolved tenant, refused
ones included (CONTRACT §9). It wraps the tenant-status check, auth, the render quota, rate
limiting and forwarding so it sees their refusals, and records the status and code the entry
stage answers (``as_proxy_error``); the row is handed to the sink without waiting. Preflights
never get here: the CORS stage answers them first."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.audit.record import AuditRecord
from proxy.context import CTX
from proxy.errors import ClientClosedRequest
from proxy.pipeline.entry import as_proxy_error
from proxy.stores.base import AuditSink


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
        except (ConnectionResetError, asyncio.CancelledError):
            status, error = ClientClosedRequest.status, ClientClosedRequest.code
            raise
        except Exception as e:  # the answer the entry stage makes of it: a refusal, or a 500
            answer = as_proxy_error(e)
            status, error = answer.status, answer.code
            raise
        finally:
            loop_now = asyncio.get_running_loop().time()
            sink.submit(
                AuditRecord(
                    created_at=created_at,
                    # After auth: on a platform domain, the key's tenant; and the key's id once
                    # it was identified, refused or not (CONTRACT §9).
                    tenant_id=ctx.tenant.id,
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
