"""merge(): every worker's samples in one exposition, each labelled with its worker."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.worker_metrics import merge


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
