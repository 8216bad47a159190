"""The audit stage records the answer the entry stage gives (CONTRACT §9): a contract error, one
of aiohttp's own refusals mapped to the contract, and an unexpected exception (the proxy's own
500) each leave a row whose status and code are what the client received."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from aiohttp.typedefs import Handler

from proxy.audit.record import AuditRecord
from proxy.context import CTX
from proxy.core.tenancy import Tenant
from proxy.errors import UpstreamTimeout
from proxy.pipeline.audit import audit_stage
from proxy.pipeline.entry import entry_stage
from proxy.settings import RouteSettings, TelemetrySettings
from proxy.telemetry import Telemetry

AT = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
TENANT = Tenant(id="dddddddd-0000-0000-0000-000000000001", slug="acme", status="Active")


class ListSink:
    def __init__(self) -> None:
        self.rows: list[AuditRecord] = []

    def submit(self, record: AuditRecord) -> None:
        self.rows.append(record)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


@web.middleware
async def resolved(request: web.Request, handler: Handler) -> web.StreamResponse:
    """What the target, tenant and route stages leave on the context."""
    ctx = request[CTX]
    ctx.tenant, ctx.path = TENANT, request.path
    ctx.route = RouteSettings(prefix="/", upstream="render-api", auth="none", audit=True)
    return await handler(request)


def raising(exc: Exception) -> Callable[[web.Request], object]:
    async def handler(_request: web.Request) -> web.StreamResponse:
        raise exc

    return handler


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (UpstreamTimeout(), 504, "upstream_timeout"),
        (web.HTTPRequestEntityTooLarge(max_size=10, actual_size=20), 413, "payload_too_large"),
        (web.HTTPBadRequest(), 400, "bad_request"),
        (RuntimeError("a bug"), 500, "internal_error"),
    ],
)
async def test_the_row_says_what_the_client_was_answered(
    aiohttp_client: Callable[[web.Application], TestClient],  # type: ignore[type-arg]
    exc: Exception,
    status: int,
    code: str,
) -> None:
    sink = ListSink()
    telemetry = Telemetry(TelemetrySettings(access_log=False))
    app = web.Application(
        middlewares=[entry_stage((), telemetry, None), resolved, audit_stage(sink, lambda: AT)]
    )
    app.router.add_route("*", "/{tail:.*}", raising(exc))  # type: ignore[arg-type]
    client = await aiohttp_client(app)  # type: ignore[misc]
    response = await client.get("/v1/renders/1")
    body = await response.json()
    assert (response.status, body["error"]["code"]) == (status, code)
    [row] = sink.rows
    assert (row.status_code, row.error_message, row.tenant_id) == (status, code, TENANT.id)
