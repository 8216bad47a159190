"""Writes deploy/grafana/flatrender-edge.json, the Grafana dashboard of the proxy's /metrics.

    python deploy/grafana/dashboard.py

The dashboard is data (``ROWS`` below): a row per area, a panel per question, PromQL per panel.
The layout (positions, ids) and the common settings (datasource variable, units, legends) are
derived here, so a new area is one more ``Row`` and a run of this script, not hand-placed JSON.
tests/e2e/test_dashboards.py checks that the JSON file is this script's output and that every
metric it names exists in a live /metrics. Import the JSON in Grafana (Dashboards > Import) and
pick the Prometheus datasource that scrapes the admin listeners.

With ``serve --workers N`` every series carries a ``worker`` label; panels that show a figure
per process group by ``instance`` and ``worker`` (without workers the label is empty).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "flatrender-edge.json"
RATE = "$__rate_interval"  # Grafana's safe rate window (at least four scrape intervals)
PER_PROCESS = "instance, worker"
WIDTH = 24  # Grafana's grid is 24 columns wide
HEIGHT = 8


@dataclass(frozen=True)
class Panel:
    title: str
    exprs: tuple[tuple[str, str], ...]  # (PromQL, legend format)
    unit: str = "short"
    description: str = ""


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def rate(selector: str, by: str) -> str:
    return f"sum by ({by}) (rate({selector}[{RATE}]))"


def ratio(part: str, whole: str) -> str:
    return f"{part} / {whole}"


def quantile(q: float, by: str, histogram: str = "edge_request_duration_seconds") -> str:
    buckets = rate(f"{histogram}_bucket", f"le, {by}" if by else "le")
    return f"histogram_quantile({q}, {buckets})"


ROWS: tuple[Row, ...] = (
    Row(
        "Traffic",
        (
            Panel(
                "Requests by route", ((rate("edge_requests_total", "route"), "{{route}}"),), "reqps"
            ),
            Panel(
                "Requests by status class",
                ((rate("edge_requests_total", "status_class"), "{{status_class}}"),),
                "reqps",
            ),
            Panel(
                "Latency p50 / p99 by route",
                (
                    (quantile(0.5, "route"), "p50 {{route}}"),
                    (quantile(0.99, "route"), "p99 {{route}}"),
                ),
                "s",
                "Time to the last byte of the answer, upstream time included.",
            ),
            Panel(
                "Latency p99 by status class",
                ((quantile(0.99, "status_class"), "p99 {{status_class}}"),),
                "s",
            ),
            Panel(
                "Share of 5xx answers",
                (
                    (
                        ratio(
                            rate('edge_requests_total{status_class="5xx"}', "route"),
                            rate("edge_requests_total", "route"),
                        ),
                        "{{route}}",
                    ),
                ),
                "percentunit",
            ),
            Panel(
                "Upstream failures",
                ((rate("edge_upstream_errors_total", "upstream, kind"), "{{upstream}} {{kind}}"),),
                "ops",
            ),
            Panel(
                "Refused before a request was read",
                ((rate("edge_connection_refusals_total", "reason"), "{{reason}}"),),
                "ops",
                "Parser errors, head deadline, connection limit.",
            ),
        ),
    ),
    Row(
        "Rate limiting",
        (
            Panel(
                "Limiter decisions",
                ((rate("edge_limiter_decisions_total", "decision"), "{{decision}}"),),
                "ops",
                "degraded: decided in process while Redis did not answer (failure_mode open).",
            ),
            Panel(
                "Limiter reaches Redis",
                ((f"min by ({PER_PROCESS}) (edge_redis_healthy)", "{{instance}} {{worker}}"),),
                "bool_yes_no",
                "0 while the breaker is open: Redis did not answer, limits are decided locally.",
            ),
            Panel(
                "Redis script calls",
                ((rate("edge_redis_calls_total", PER_PROCESS), "{{instance}} {{worker}}"),),
                "ops",
            ),
        ),
    ),
    Row(
        "Caches and stores",
        (
            Panel(
                "Identity cache hit rate",
                (
                    (
                        ratio(
                            rate('edge_cache_events_total{event="hit"}', "cache"),
                            rate('edge_cache_events_total{event=~"hit|miss"}', "cache"),
                        ),
                        "{{cache}}",
                    ),
                ),
                "percentunit",
            ),
            Panel(
                "Stale entries served",
                ((rate('edge_cache_events_total{event="stale_served"}', "cache"), "{{cache}}"),),
                "ops",
                "Answers from entries past their TTL while Postgres did not answer.",
            ),
            Panel(
                "Store errors",
                ((rate("edge_store_errors_total", "store"), "{{store}}"),),
                "ops",
            ),
            Panel(
                "Miss-budget refusals",
                (
                    (
                        rate("edge_miss_budget_refusals_total", PER_PROCESS),
                        "{{instance}} {{worker}}",
                    ),
                ),
                "ops",
                "Uncached lookups over tenancy.max_miss_lookups_per_s, answered 503 "
                "tenant_store_unavailable: a flood of unknown hosts or key prefixes.",
            ),
            Panel(
                "Unknown names remembered",
                (
                    (
                        f"sum by ({PER_PROCESS}) (edge_cache_negative_entries)",
                        "{{instance}} {{worker}}",
                    ),
                ),
                "short",
                "Misses cached apart from the known tenants and keys.",
            ),
        ),
    ),
    Row(
        "Render quota",
        (
            Panel(
                "Quota decisions",
                ((rate("edge_quota_decisions_total", "decision"), "{{decision}}"),),
                "ops",
                "Metered POSTs. degraded_*: decided in process while Redis did not answer; "
                "unavailable: answered 503.",
            ),
            Panel(
                "Quota units kept or given back",
                ((rate("edge_quota_settlements_total", "outcome"), "{{outcome}}"),),
                "ops",
                "kept: the upstream's answer began with a 2xx; given_back: anything else "
                "(refused, failed, client gone).",
            ),
            Panel(
                "Month counts rebuilt",
                ((rate("edge_quota_rebuilds_total", PER_PROCESS), "{{instance}} {{worker}}"),),
                "ops",
                "Counts missing from the quota store, rebuilt from renders_started.",
            ),
        ),
    ),
    Row(
        "Webhooks",
        (
            Panel(
                "Attempts by outcome",
                ((rate("edge_webhook_attempts_total", "outcome"), "{{outcome}}"),),
                "ops",
            ),
            Panel(
                "Attempt latency p50 / p99",
                (
                    (quantile(0.5, "", "edge_webhook_attempt_duration_seconds"), "p50"),
                    (quantile(0.99, "", "edge_webhook_attempt_duration_seconds"), "p99"),
                ),
                "s",
                "From sending the request to the receiver's answer (or the failure).",
            ),
            Panel(
                "Backlog: attempts due and not yet made",
                (("max(edge_webhook_attempts_due)", "due"),),
                "short",
                "A figure of the whole deployment, reported alike by every process "
                "(hence max, not sum). It should stay near 0.",
            ),
            Panel(
                "Disabled webhooks",
                (("max(edge_webhooks_disabled)", "disabled"),),
                "short",
                "Webhooks disabled after webhooks.disable_after_failures failed attempts "
                "in a row (whole deployment).",
            ),
            Panel(
                "Attempts in flight",
                (
                    (
                        f"sum by ({PER_PROCESS}) (edge_webhook_attempts_in_flight)",
                        "{{instance}} {{worker}}",
                    ),
                ),
                "short",
            ),
        ),
    ),
    Row(
        "Audit",
        (
            Panel(
                "Audit queue",
                ((f"sum by ({PER_PROCESS}) (edge_audit_queue_depth)", "{{instance}} {{worker}}"),),
                "short",
                "Rows waiting in memory for the next batch.",
            ),
            Panel(
                "Audit rows by outcome",
                ((rate("edge_audit_rows_total", "outcome"), "{{outcome}}"),),
                "rowsps",
                "spooled: to spool_dir while Postgres is down; replayed: back from it; "
                "dropped: lost past spool_max_bytes.",
            ),
            Panel(
                "Last audit flush",
                (
                    (
                        f"max by ({PER_PROCESS}) (edge_audit_last_flush_seconds)",
                        "{{instance}} {{worker}}",
                    ),
                ),
                "s",
            ),
        ),
    ),
    Row(
        "Processes and workers",
        (
            Panel(
                "Requests per worker",
                ((rate("edge_requests_total", PER_PROCESS), "{{instance}} {{worker}}"),),
                "reqps",
            ),
            Panel(
                "Event-loop tasks",
                ((f"sum by ({PER_PROCESS}) (edge_asyncio_tasks)", "{{instance}} {{worker}}"),),
                "short",
                "Requests in flight plus background jobs: a line that only grows is a leak.",
            ),
            Panel(
                "Background job failures",
                (
                    (
                        rate("edge_background_job_failures_total", "background_job"),
                        "{{background_job}}",
                    ),
                ),
                "ops",
            ),
            Panel(
                "Garbage collections",
                (
                    (
                        rate("python_gc_collections_total", f"{PER_PROCESS}, generation"),
                        "{{instance}} {{worker}} gen {{generation}}",
                    ),
                ),
                "ops",
            ),
            Panel(
                "Workers in a scrape",
                (("min by (instance) (edge_metrics_workers_answered)", "{{instance}}"),),
                "short",
                "serve --workers N: fewer than N while a worker restarts.",
            ),
        ),
    ),
    Row(
        "Custom domains",
        (
            Panel(
                "Domain checks",
                (
                    (
                        rate("edge_domain_checks_total", "method, outcome"),
                        "{{method}} {{outcome}}",
                    ),
                ),
                "ops",
                "Checks of pending custom domains (domains add), made by the one checking process.",
            ),
            Panel(
                "Checking process",
                (
                    (
                        f"sum by ({PER_PROCESS}) (edge_domain_verifier_active)",
                        "{{instance}} {{worker}}",
                    ),
                ),
                "short",
                "1 in the process that holds the verifier's lock, 0 in the others.",
            ),
        ),
    ),
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _panel(panel: Panel, panel_id: int, x: int, y: int, width: int) -> dict[str, object]:
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": HEIGHT, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "datasource": DATASOURCE,
            }
            for i, (expr, legend) in enumerate(panel.exprs)
        ],
    }


def build() -> dict[str, object]:
    """The dashboard as Grafana's JSON model: each row, then its panels three abreast."""
    panels: list[dict[str, object]] = []
    y = 0
    for row in ROWS:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        width = WIDTH // 3
        for i, panel in enumerate(row.panels):
            x, y_offset = (i % 3) * width, (i // 3) * HEIGHT
            panels.append(_panel(panel, len(panels) + 1, x, y + y_offset, width))
        y += -(-len(row.panels) // 3) * HEIGHT
    return {
        "uid": "flatrender-edge",
        "title": "FlatRender Edge",
        "tags": ["flatrender", "edge"],
        "timezone": "utc",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
