"""``/metrics`` for all workers of ``serve --workers N``, whichever worker answers the scrape.

The workers share the admin port (SO_REUSEPORT), so a scrape reaches one of them at random, and
each keeps its own figures. Each worker therefore also serves its own figures on a unix socket
in a directory the supervisor made. The worker that gets the scrape asks its siblings, and
answers with every worker's samples, each labelled ``worker="<index>"``. Prometheus then sums
or compares them per worker, as it does for any multi-process exporter.

prometheus-client's own multiprocess mode does not fit here. It shares only the metric types
it defines, through files, and most of the proxy's figures are read at scrape time from the
stores' counters (``telemetry.collect_from``).

A worker that does not answer within the deadline (one being restarted, say) is left out of
that scrape; its series resume with the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("proxy.worker_metrics")

SIBLING_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class WorkerSet:
    directory: Path  # made (and removed) by the supervisor
    index: int  # this worker's
    count: int

    def socket(self, index: int) -> Path:
        return self.directory / f"worker-{index}.sock"


async def serve_own(workers: WorkerSet, exposition: web.Application) -> web.AppRunner | None:
    """This worker's own figures on its socket (a restarted worker replaces the old file).

    A socket that cannot be made (a path over the unix-socket length limit, a directory a
    temp cleaner removed) costs the siblings this worker's figures, not the worker: it is
    already serving requests, and failing here would have it restarted in a loop."""
    path = workers.socket(workers.index)
    runner = web.AppRunner(exposition, access_log=None)
    await runner.setup()
    try:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        await web.UnixSite(runner, str(path)).start()
    except OSError as e:
        log.warning("worker metrics: cannot serve %s (%s): scrapes will miss this worker", path, e)
        await runner.cleanup()
        return None
    return runner


async def _fetch(path: Path) -> str | None:
    try:
        async with (
            asyncio.timeout(SIBLING_TIMEOUT_S),
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session,
            session.get("http://worker/metrics") as response,
        ):
            response.raise_for_status()
            return await response.text()
    except (OSError, TimeoutError, aiohttp.ClientError) as e:
        log.info("worker metrics: %s did not answer (%s)", path.name, type(e).__name__)
        return None


async def all_workers(workers: WorkerSet, own: bytes) -> bytes:
    """Every worker's samples with a ``worker`` label, as one exposition."""
    others = [i for i in range(workers.count) if i != workers.index]
    texts = await asyncio.gather(*(_fetch(workers.socket(i)) for i in others))
    by_worker = {workers.index: own.decode()}
    by_worker.update({i: t for i, t in zip(others, texts, strict=True) if t is not None})
    # Parsing and rendering N expositions is pure Python: in a thread, the event loop keeps
    # its turns (the GIL is handed over every few ms) instead of waiting for the whole merge.
    return await asyncio.to_thread(merge, by_worker)


def merge(by_worker: dict[int, str]) -> bytes:
    answered = Metric(
        "edge_metrics_workers_answered", "Workers whose figures this scrape holds", "gauge"
    )
    answered.add_sample("edge_metrics_workers_answered", {}, len(by_worker))
    families: dict[str, Metric] = {answered.name: answered}
    for index in sorted(by_worker):
        for family in text_string_to_metric_families(by_worker[index]):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for s in family.samples:
                labels = dict(s.labels)
                if "worker" in labels:  # never two labels of one name (Prometheus's convention)
                    labels["exported_worker"] = labels.pop("worker")
                labels["worker"] = str(index)
                merged.add_sample(s.name, labels, s.value, s.timestamp)

    class _Merged:
        def collect(self) -> Iterable[Metric]:
            return families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)
