"""Audit stage: one row per request on an ``audit = true`` route of a resolved tenant, refused
ones included (CONTRACT §9). It starts before the tenant-status check, auth, the render quota,
rate limiting and forwarding and finishes with the answer (``pipeline.plan``), so it sees their
refusals, and records the status and code the entry stage answers (``as_proxy_error``); the
row is handed to the sink without waiting. Preflights
never get here: the CORS stage answers them first."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

from aiohttp import web

from proxy.audit.record import AuditRecord
from proxy.context import RequestContext
from proxy.errors import ClientClosedRequest
from proxy.stores.base import AuditSink


class AuditStage:
    """``start`` when the plan reaches an audited route, ``finish`` with the answer's status
    once it is known, whatever happened in between (the plan's one ``finally``)."""

    __slots__ = ("_clock", "_sink")

    def __init__(self, sink: AuditSink, clock: Callable[[], datetime]) -> None:
        self._sink = sink
        self._clock = clock

    def start(self, ctx: RequestContext) -> None:
        ctx.audited_at = self._clock()

    def finish(self, request: web.Request, ctx: RequestContext, status: int) -> None:
        created_at = ctx.audited_at
        assert created_at is not None and ctx.tenant is not None  # start ran
        if status == ClientClosedRequest.status:
            error: str | None = ClientClosedRequest.code
        else:
            error = ctx.error_code  # the code of the proxy's own answer (as_proxy_error)
        loop_now = asyncio.get_running_loop().time()
        self._sink.submit(
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
