"""How long the cyclic garbage collector stops the process (``edge_gc_pause_seconds``).

A collection runs on the event loop's thread: for its whole duration no request makes progress,
so its length is added to the latency of every request in flight. ``gc.callbacks`` (PEP 442's
companion hook, Python >= 3.3) is called at the start and the end of each collection.

The callback may run at any allocation, inside any code, including prometheus-client's own
locked sections: it therefore takes no lock and only updates plain counters, which the
collector reads at scrape time.
"""

from __future__ import annotations

import bisect
import gc
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

# From well under a millisecond (a young collection) to a second (a full one over a large heap).
PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
GENERATIONS = ("0", "1", "2")


class GcPauses:
    """Pauses per generation since ``install``; ``max_s`` the longest one."""

    def __init__(self) -> None:
        self.buckets = [[0] * (len(PAUSE_BUCKETS) + 1) for _ in GENERATIONS]
        self.sums = [0.0] * len(GENERATIONS)
        self.max_s = 0.0
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if not self._started:
            return  # installed during a collection: its start was not seen
        pause = time.perf_counter() - self._started
        generation = info["generation"]
        self.buckets[generation][bisect.bisect_left(PAUSE_BUCKETS, pause)] += 1
        self.sums[generation] += pause
        if pause > self.max_s:
            self.max_s = pause

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "edge_gc_pause_seconds",
            "Time the cyclic garbage collector stopped the process, by generation",
            labels=["generation"],
        )
        for generation, counts in zip(GENERATIONS, self.buckets, strict=True):
            cumulative, running = [], 0
            for bound, n in zip((*map(str, PAUSE_BUCKETS), "+Inf"), counts, strict=True):
                running += n
                cumulative.append((bound, running))
            family.add_metric([generation], cumulative, self.sums[int(generation)])
        yield family
        yield GaugeMetricFamily(
            "edge_gc_pause_max_seconds",
            "The longest garbage-collection pause since start-up",
            value=self.max_s,
        )
