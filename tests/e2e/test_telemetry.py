"""Traces, metrics and the access log (CONTRACT §10, issue 7)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import build_admin_app, build_app, build_stores
from proxy.settings import load_settings
from proxy.telemetry import Telemetry
from tests.procs import ACME_ID, DEMO_KEY, Echo, start_proxy, stop, write_config

HOST = "videos.acme.test"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def _config(tmp: Path, echo: Echo) -> Path:
    return write_config(
        tmp / "edge.toml",
        upstreams={"render-api": {"urls": [echo.url]}},
        routes=[
            {
                "prefix": "/v1/renders",
                "upstream": "render-api",
                "auth": "api_key",
                "scopes": {"GET": "renders:read"},
            },
            {"prefix": "/public", "upstream": "render-api", "auth": "none"},
        ],
    )


@pytest.fixture
async def proxy_app(
    echo: Echo, tmp_path: Path
) -> AsyncIterator[tuple[TestClient[Any, Any], TestClient[Any, Any], InMemorySpanExporter]]:
    settings = load_settings({}, str(_config(tmp_path, echo)))
    stores = build_stores(settings)
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(settings.telemetry, exporter=exporter)
    app = build_app(settings, stores, telemetry=telemetry)
    admin = build_admin_app(stores, settings.tenancy.platform_domains, telemetry=telemetry)
    async with TestClient(TestServer(app)) as client, TestClient(TestServer(admin)) as adm:
        yield client, adm, exporter


async def test_spans_form_one_trace_continuing_the_clients(
    proxy_app: tuple[TestClient[Any, Any], TestClient[Any, Any], InMemorySpanExporter],
) -> None:
    client, _, exporter = proxy_app
    r = await client.get(
        "/v1/renders/7?token=secret",
        headers={
            "Host": HOST,
            "X-API-Key": DEMO_KEY,
            "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
        },
    )
    assert r.status == 200
    echoed = await r.json()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    server = spans["GET"]
    assert server.kind is SpanKind.SERVER
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert server.parent is not None and f"{server.parent.span_id:016x}" == PARENT_ID
    for name in ("edge.tenant", "edge.auth", "edge.ratelimit", "edge.upstream"):
        child = spans[name]
        assert child.parent is not None and child.parent.span_id == server.context.span_id, name
        assert child.context.trace_id == server.context.trace_id
    assert spans["edge.upstream"].kind is SpanKind.CLIENT
    attrs = dict(server.attributes or {})
    assert attrs["http.response.status_code"] == 200
    assert attrs["flatrender.tenant_id"] == ACME_ID
    assert attrs["flatrender.route"] == "/v1/renders"
    assert attrs["flatrender.limiter"] == "allowed"
    assert attrs["flatrender.api_key_id"] == "3b0d7a52-5f0e-4c1a-8d2e-6a1f9b7c4e01"
    everything = json.dumps([dict(s.attributes or {}) for s in spans.values()])
    assert DEMO_KEY not in everything and "secret" not in everything
    # The upstream continues the same trace, as a child of the proxy's upstream span.
    sent = [v for k, v in echoed["headers"] if k.lower() == "traceparent"]
    assert sent == [f"00-{TRACE_ID}-{spans['edge.upstream'].context.span_id:016x}-01"]


async def test_without_an_exporter_the_upstream_continues_the_trace_with_a_span_id_of_its_own(
    echo: Echo, tmp_path: Path
) -> None:
    """CONTRACT §10: exporter ``none`` has no SDK span, yet the upstream's traceparent is a
    child of the proxy: same trace-id and flags, a new parent-id. An invalid or missing one
    starts a new (unsampled) trace, and a tracestate belonging to an invalid one is dropped."""
    settings = load_settings({}, str(_config(tmp_path, echo)))
    app = build_app(settings, build_stores(settings))  # OTEL_TRACES_EXPORTER unset: no tracer

    async def sent(headers: dict[str, str]) -> tuple[list[str], list[str]]:
        r = await client.get("/public/x", headers={"Host": HOST, **headers})
        echoed = (await r.json())["headers"]
        return (
            [v for k, v in echoed if k.lower() == "traceparent"],
            [v for k, v in echoed if k.lower() == "tracestate"],
        )

    async with TestClient(TestServer(app)) as client:
        inbound = f"00-{TRACE_ID}-{PARENT_ID}-01"
        parents, states = await sent({"traceparent": inbound, "tracestate": "acme=1"})
        assert len(parents) == 1 and parents[0] != inbound
        version, trace_id, span_id, flags = parents[0].split("-")
        assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
        assert re.fullmatch(r"[0-9a-f]{16}", span_id) and span_id not in (PARENT_ID, "0" * 16)
        assert states == ["acme=1"]
        again, _ = await sent({"traceparent": inbound})
        assert again[0].split("-")[2] != span_id  # one span id per request
        for invalid in ("garbage", f"00-{'0' * 32}-{PARENT_ID}-01", f"00-{TRACE_ID}-{'0' * 16}-01"):
            parents, states = await sent({"traceparent": invalid, "tracestate": "acme=1"})
            assert len(parents) == 1, invalid
            assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", parents[0]), invalid
            assert TRACE_ID not in parents[0] and states == [], invalid
        parents, _ = await sent({})
        assert len(parents) == 1 and re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", parents[0])


async def test_sampler_always_off_passes_the_clients_traceparent_unchanged(
    echo: Echo, tmp_path: Path
) -> None:
    """CONTRACT §10: with ``always_off`` the proxy takes no part in the trace, whatever the
    exporter: the client's traceparent goes upstream as received, and none when it sent none."""
    settings = load_settings({"OTEL_TRACES_SAMPLER": "always_off"}, str(_config(tmp_path, echo)))
    exporter = InMemorySpanExporter()
    app = build_app(
        settings, build_stores(settings), telemetry=Telemetry(settings.telemetry, exporter)
    )
    async with TestClient(TestServer(app)) as client:
        inbound = f"00-{TRACE_ID}-{PARENT_ID}-01"
        for sent, expected in (({"traceparent": inbound}, [inbound]), ({}, [])):
            r = await client.get("/public/x", headers={"Host": HOST, **sent})
            echoed = (await r.json())["headers"]
            assert [v for k, v in echoed if k.lower() == "traceparent"] == expected
    assert exporter.get_finished_spans() == ()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_parse_and_move(
    proxy_app: tuple[TestClient[Any, Any], TestClient[Any, Any], InMemorySpanExporter],
) -> None:
    client, admin, _ = proxy_app
    before = _samples(await (await admin.get("/metrics")).text())
    for _ in range(3):
        assert (await client.get("/public/x", headers={"Host": HOST})).status == 200
    assert (await client.get("/nowhere", headers={"Host": HOST})).status == 404
    assert (
        await client.get("/v1/renders/1", headers={"Host": HOST, "X-API-Key": DEMO_KEY})
    ).status == 200
    r = await admin.get("/metrics")
    assert r.headers["Content-Type"].startswith("text/plain")
    after = _samples(await r.text())

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("edge_requests_total", route="/public", status_class="2xx") == 3
    assert moved("edge_requests_total", route="none", status_class="4xx") == 1
    assert moved("edge_request_duration_seconds_count", route="/public", status_class="2xx") == 3
    assert moved("edge_limiter_decisions_total", decision="allowed") == 1


async def test_a_serving_proxy_has_frozen_its_start_up_objects(echo: Echo, tmp_path: Path) -> None:
    """gc.freeze after start-up: a full collection then walks only what requests made, so its
    pause no longer grows with the size of the loaded program (15.6 ms -> 0.7 ms measured)."""
    import aiohttp

    proxy = start_proxy(_config(tmp_path, echo))
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{proxy.admin_port}/metrics") as r,
        ):
            samples = _samples(await r.text())
    finally:
        stop(proxy.proc)
    assert samples[("edge_gc_frozen_objects", ())] > 10_000
    assert samples[("edge_asyncio_tasks", ())] >= 1  # at least the scrape's own
    assert ("python_gc_collections_total", (("generation", "2"),)) in samples


async def test_access_log_is_json_without_secrets(echo: Echo, tmp_path: Path) -> None:
    proxy = start_proxy(_config(tmp_path, echo))
    try:
        import aiohttp

        async with (
            aiohttp.ClientSession() as s,
            s.get(
                f"{proxy.url}/v1/renders/9?signature=s3cr3t",
                headers={
                    "Host": HOST,
                    "Authorization": f"Bearer {DEMO_KEY}",
                    "X-Request-Id": "6a1f9b7c-4e01-4c1a-8d2e-3b0d7a525f0e",
                },
            ) as r,
        ):
            assert r.status == 200
            await r.read()
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{proxy.url}/v1/renders/9", headers={"Host": HOST}) as r,
        ):
            assert r.status == 401
            refused_bytes = len(await r.read())  # the proxy's own JSON answer
    finally:
        output = proxy.output()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    line = next(entry for entry in lines if entry["request_id"].startswith("6a1f9b7c"))
    assert line["status"] == 200 and line["path"] == "/v1/renders/9"
    assert line["tenant_id"] == ACME_ID and line["route"] == "/v1/renders"
    assert line["api_key_id"] and line["limiter"] == "allowed"
    assert line["duration_ms"] >= line["upstream_ms"] > 0 and line["bytes_sent"] > 0
    refused = next(entry for entry in lines if entry["error"] == "missing_api_key")
    assert refused["status"] == 401 and refused["bytes_sent"] == refused_bytes
    assert DEMO_KEY not in output and "s3cr3t" not in output


async def test_access_log_can_be_switched_off(echo: Echo, tmp_path: Path) -> None:
    config = _config(tmp_path, echo)
    config.write_text(config.read_text() + "\n[telemetry]\naccess_log = false\n")
    proxy = start_proxy(config)
    try:
        import aiohttp

        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{proxy.url}/public/x", headers={"Host": HOST}) as r,
        ):
            assert r.status == 200
    finally:
        output = proxy.output()
    assert not [line for line in output.splitlines() if line.startswith("{")]


def test_bad_telemetry_environment_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.procs import ROOT

    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OTEL_TRACES_EXPORTER": "zipkinish"},
        timeout=30,
    )
    assert result.returncode == 2 and "OTEL_TRACES_EXPORTER" in result.stderr
    assert "Traceback" not in result.stderr
