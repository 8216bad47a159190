"""The audit row records the answer the client gets (CONTRACT §9): a contract error, one of
aiohttp's own refusals mapped to the contract, and an unexpected exception (the proxy's own
500) each leave a row whose status and code are what the client received. Driven through the
application's real plan, with the forwarding step replaced by one that raises."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import PIPELINE, build_app, build_stores
from proxy.audit.record import AuditRecord
from proxy.context import RequestContext
from proxy.errors import UpstreamTimeout
from proxy.pipeline.quota import QuotaStage
from proxy.settings import load_settings
from proxy.telemetry import Telemetry
from tests.procs import ACME_ID, write_config

HOST = "videos.acme.test"


class ListSink:
    def __init__(self) -> None:
        self.rows: list[AuditRecord] = []

    def submit(self, record: AuditRecord) -> None:
        self.rows.append(record)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


def raising(exc: Exception) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def forward(_request: web.Request) -> web.StreamResponse:
        raise exc

    return forward


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
    tmp_path: Path, exc: Exception, status: int, code: str
) -> None:
    config = write_config(
        tmp_path / "edge.toml",
        upstreams={"render-api": {"urls": ["http://127.0.0.1:9"]}},
        routes=[{"prefix": "/", "upstream": "render-api", "auth": "none", "audit": True}],
        sections={"telemetry": {"access_log": False}},
    )
    settings = load_settings({}, str(config))
    sink = ListSink()
    stores = dataclasses.replace(build_stores(settings), audit=sink)
    app = build_app(settings, stores)
    app[PIPELINE].forward = raising(exc)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/v1/renders/1", headers={"Host": HOST})
        body = await response.json()
    assert (response.status, body["error"]["code"]) == (status, code)
    [row] = sink.rows
    assert (row.status_code, row.error_message, row.tenant_id) == (status, code, ACME_ID)


async def test_a_failing_finisher_leaves_the_row_the_metrics_and_the_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A step that raises once the answer is known (here the quota's settlement) is logged
    and counted; the request still gets its audit row (§9), its metrics and its answer."""

    def broken(_self: QuotaStage, _ctx: RequestContext) -> None:
        raise RuntimeError("settlement failed")

    monkeypatch.setattr(QuotaStage, "finish", broken)
    config = write_config(
        tmp_path / "edge.toml",
        upstreams={"render-api": {"urls": ["http://127.0.0.1:9"]}},
        routes=[
            {"prefix": "/", "upstream": "render-api", "auth": "none", "audit": True}
            | {"meter": "renders"}
        ],
        sections={"telemetry": {"access_log": False}},
    )
    settings = load_settings({}, str(config))
    sink = ListSink()
    telemetry = Telemetry(settings.telemetry)
    app = build_app(
        settings, dataclasses.replace(build_stores(settings), audit=sink), telemetry=telemetry
    )

    async def answered(_request: web.Request) -> web.StreamResponse:
        return web.Response(text="rendered")

    app[PIPELINE].forward = answered
    async with TestClient(TestServer(app)) as client:
        response = await client.post("/v1/renders", headers={"Host": HOST})
        assert (response.status, await response.text()) == (200, "rendered")
    [row] = sink.rows
    assert row.status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(telemetry.exposition().decode())
        for s in family.samples
    }
    assert samples[("edge_requests_total", (("route", "/"), ("status_class", "2xx")))] == 1
    assert samples[("edge_request_finisher_failures_total", (("finisher", "quota"),))] == 1
    assert "settlement failed" in caplog.text
