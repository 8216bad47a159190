"""edge_gc_pause_seconds: every collection is counted under its generation, through gc.callbacks."""

from __future__ import annotations

import gc

from prometheus_client.core import Metric

from proxy.gcpauses import GcPauses
from proxy.settings import TelemetrySettings
from proxy.telemetry import Telemetry


def samples(pauses: GcPauses) -> dict[tuple[str, str], float]:
    metrics: list[Metric] = list(pauses.collect())
    return {
        (s.name, s.labels.get("generation", "") + s.labels.get("le", "")): s.value
        for m in metrics
        for s in m.samples
    }


def test_a_full_collection_is_counted_under_generation_2() -> None:
    pauses = GcPauses()
    pauses.install()
    try:
        gc.collect()
        gc.collect(0)
    finally:
        pauses.uninstall()
    seen = samples(pauses)
    assert seen[("edge_gc_pause_seconds_count", "2")] >= 1
    assert seen[("edge_gc_pause_seconds_count", "0")] >= 1
    assert (
        seen[("edge_gc_pause_seconds_bucket", "2+Inf")]
        == seen[("edge_gc_pause_seconds_count", "2")]
    )
    assert seen[("edge_gc_pause_max_seconds", "")] == pauses.max_s > 0
    assert seen[("edge_gc_pause_seconds_sum", "2")] > 0


def test_nothing_is_counted_once_uninstalled() -> None:
    pauses = GcPauses()
    pauses.install()
    pauses.install()  # once only
    gc.collect()
    pauses.uninstall()
    before = samples(pauses)
    assert before[("edge_gc_pause_seconds_count", "2")] == 1
    gc.collect()
    assert samples(pauses) == before
    assert pauses._callback not in gc.callbacks


def test_the_histogram_is_on_metrics_and_shutdown_removes_the_hook() -> None:
    telemetry = Telemetry(TelemetrySettings())
    gc.collect()
    text = telemetry.exposition().decode()
    assert 'edge_gc_pause_seconds_bucket{generation="2",le="+Inf"}' in text
    assert "edge_gc_pause_max_seconds" in text
    telemetry.shutdown()
    assert telemetry.gc_pauses._callback not in gc.callbacks
