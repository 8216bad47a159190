"""merge(): every worker's samples in one exposition, each labelled with its worker."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.worker_metrics import WorkerSet, merge, serve_own


def _worker_text(requests: int, depth: float, seconds: list[float]) -> str:
    registry = CollectorRegistry()
    Counter("edge_requests", "Requests", ["route"], registry=registry).labels("/v1").inc(requests)
    Gauge("edge_audit_queue_depth", "Rows waiting", registry=registry).set(depth)
    latency = Histogram("edge_request_duration_seconds", "Latency", registry=registry)
    for s in seconds:
        latency.observe(s)
    return generate_latest(registry).decode()


def test_samples_of_every_worker_survive_with_their_worker_label() -> None:
    merged = merge({0: _worker_text(3, 5, [0.01]), 1: _worker_text(4, 0, [0.2, 0.3])})
    samples = [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(merged.decode())
        for s in family.samples
    ]
    requests = {
        lb["worker"]: v
        for n, lb, v in samples
        if n == "edge_requests_total" and lb["route"] == "/v1"
    }
    assert requests == {"0": 3, "1": 4}
    depth = {lb["worker"]: v for n, lb, v in samples if n == "edge_audit_queue_depth"}
    assert depth == {"0": 5, "1": 0}
    counts = {lb["worker"]: v for n, lb, v in samples if n == "edge_request_duration_seconds_count"}
    assert counts == {"0": 1, "1": 2}
    buckets = [lb for n, lb, _ in samples if n == "edge_request_duration_seconds_bucket"]
    assert {lb["worker"] for lb in buckets} == {"0", "1"} and all("le" in lb for lb in buckets)
    # One family per name, not one per worker: a scraper sees each TYPE line once.
    assert merged.decode().count("# TYPE edge_requests_total counter") == 1


def test_a_worker_label_of_the_metric_itself_is_kept_as_exported_worker() -> None:
    registry = CollectorRegistry()
    Gauge("jobs", "Jobs", ["worker"], registry=registry).labels("thumbnailer").set(2)
    merged = merge({1: generate_latest(registry).decode()}).decode()
    samples = {
        s.name: s for family in text_string_to_metric_families(merged) for s in family.samples
    }
    assert samples["jobs"].labels == {"exported_worker": "thumbnailer", "worker": "1"}
    assert samples["edge_metrics_workers_answered"].value == 1


async def test_a_socket_that_cannot_be_made_costs_the_figures_not_the_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gone = WorkerSet(tmp_path / "removed-by-a-temp-cleaner", 0, 2)
    assert await serve_own(gone, web.Application()) is None
    assert "scrapes will miss this worker" in caplog.text
