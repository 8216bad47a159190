"""The dashboard and the alert rules of deploy/ against a live /metrics (CONTRACT §10).

Every metric that deploy/grafana/flatrender-edge.json or deploy/prometheus/alerts.yml names
exists in the /metrics of a running proxy (database mode, Redis, two workers: every family
the proxy can expose), every label they match on or group by exists on it, and promtool finds
the rules valid and their unit tests (deploy/prometheus/alerts_test.yml) passing. Nothing here
knows which metrics the files use: a panel or a rule added later is checked the same way.
"""

from __future__ import annotations

import contextlib
import json
import re
import runpy
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.dnsserver import LoopbackDns
from tests.e2e.support import seeded_database
from tests.procs import ROOT, Echo, Proxy, free_port, start_proxy, stop, write_config
from tests.servers import PostgresServer, RedisServer

DASHBOARD = ROOT / "deploy" / "grafana" / "flatrender-edge.json"
GENERATOR = ROOT / "deploy" / "grafana" / "dashboard.py"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
# Labels Prometheus adds to every series it scrapes: never on /metrics itself.
TARGET_LABELS = frozenset({"instance", "job"})

# --------------------------------------------------------------------------- PromQL, read enough

_RANGE = re.compile(r"\[[^\]]*\]")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"(?:[^\"\\]|\\.)*\"\s*,?")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


@dataclass
class Used:
    """What one PromQL expression asks of /metrics."""

    metrics: dict[str, set[str]] = field(default_factory=dict)  # name -> labels matched on
    grouping: set[str] = field(default_factory=set)  # labels of by/without/on/ignoring


def read_promql(expr: str) -> Used:
    """The metric names of ``expr``, the labels each is matched on, and the grouping labels.
    Enough PromQL for dashboards and rules: selectors, functions, aggregations, binary
    operators; Grafana's ``$__variables`` only in range brackets."""
    used = Used()
    text = _RANGE.sub("", expr)
    for grouping in _GROUPING.findall(text):
        used.grouping |= {label.strip() for label in grouping.split(",") if label.strip()}
    text = _GROUPING.sub(" ", text)
    blocks: list[str] = []

    def hold(match: re.Match[str]) -> str:
        blocks.append(match[1])
        return f"{{#{len(blocks) - 1}}}"

    text = _MATCHERS.sub(hold, text)
    for match in _IDENT.finditer(text):
        name, call = match[1], match[2]
        if call or name in _KEYWORDS:
            continue
        labels = used.metrics.setdefault(name, set())
        after = text[match.end() :].lstrip()
        if after.startswith("{#"):
            block = blocks[int(after[2 : after.index("}")])]
            assert _MATCHER.sub("", block) == "", f"unreadable matchers {block!r} in {expr!r}"
            labels |= {m[1] for m in _MATCHER.finditer(block)}
    return used


@pytest.mark.parametrize(
    ("expr", "metrics", "grouping"),
    [
        ("up", {"up": set()}, set()),
        (
            'sum by (route) (rate(edge_requests_total{status_class="5xx"}[$__rate_interval]))',
            {"edge_requests_total": {"status_class"}},
            {"route"},
        ),
        (
            "histogram_quantile(0.99, sum by (le, route) (rate(a_bucket[5m]))) > 2.5",
            {"a_bucket": set()},
            {"le", "route"},
        ),
        (
            'sum(increase(x_total{outcome="a", kind=~"b|c"}[15m])) > sum(y) or on() vector(0)',
            {"x_total": {"outcome", "kind"}, "y": set()},
            set(),
        ),
        (
            "min by (instance, worker) (g) == 0 unless bool h",
            {"g": set(), "h": set()},
            {"instance", "worker"},
        ),
    ],
)
def test_read_promql(expr: str, metrics: dict[str, set[str]], grouping: set[str]) -> None:
    used = read_promql(expr)
    assert (used.metrics, used.grouping) == (metrics, grouping)


# --------------------------------------------------------------------------- the files


def dashboard_exprs() -> list[str]:
    model = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in model["panels"] for t in p.get("targets", [])]


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def test_the_dashboard_is_the_generators_output() -> None:
    render = runpy.run_path(str(GENERATOR))["render"]
    assert DASHBOARD.read_text() == render(), (
        "deploy/grafana/flatrender-edge.json is stale: run python deploy/grafana/dashboard.py"
    )
    model = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    for panel in model["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def _promtool() -> str:
    binary = shutil.which("promtool")
    assert binary, "promtool is not installed: run scripts/ensure-test-servers.sh"
    return binary


def test_promtool_finds_the_rules_valid_and_their_tests_passing() -> None:
    for command in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        result = subprocess.run(
            [_promtool(), *command], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_has_a_unit_test() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])}
    firing = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    assert alerts == tested == firing


# --------------------------------------------------------------------------- a live /metrics


@dataclass
class Exposition:
    names: set[str]  # every series name the text can hold (a counter's _total, a histogram's...)
    labels: dict[str, set[str]]  # series name -> label names seen on it


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
}


def exposition(text: str) -> Exposition:
    found = Exposition(set(), {})
    for family in text_string_to_metric_families(text):
        found.names.add(family.name)
        found.names |= {family.name + s for s in _SUFFIXES.get(family.type, ())}
        for sample in family.samples:
            found.names.add(sample.name)
            found.labels.setdefault(sample.name, set()).update(sample.labels)
    return found


@pytest.fixture(scope="module")
def live_metrics(
    echo: Echo,
    dns_server: LoopbackDns,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Exposition]:
    """/metrics of a proxy with every store, the domain verifier, the webhook dispatcher and
    two workers, after requests that make the labelled series appear (a route answered, a
    dead upstream, a refused connection). Series whose label values are known in advance
    (limiter, quota, cache, audit, domain-check and webhook-attempt outcomes) are exposed at
    zero from the start."""

    async def nothing(_conn: object) -> None:
        return None

    dsn = seeded_database(postgres_server, "dashboards", nothing)
    config = write_config(
        tmp_path_factory.mktemp("dashboards") / "edge.toml",
        upstreams={
            "render-api": {"urls": [echo.url]},
            "dead": {"urls": [f"http://127.0.0.1:{free_port()}"], "connect_timeout_s": 1},
        },
        routes=[
            {"prefix": "/public", "upstream": "render-api", "auth": "none", "audit": True},
            {"prefix": "/dead", "upstream": "dead", "auth": "none"},
        ],
        domains={"verify": True, "nameservers": [dns_server.address]},
        # The default in database mode, said here: the webhook figures need the dispatcher.
        sections={"webhooks": {"enabled": True}},
    )
    proxy = start_proxy(
        config,
        env={"DATABASE_URL": dsn, "REDIS_URL": redis_server.url},
        args=("--workers", "2"),
    )
    try:
        yield exposition(_scrape_after_traffic(proxy))
    finally:
        stop(proxy.proc)


def _scrape_after_traffic(proxy: Proxy) -> str:
    for path in ("/public/x", "/dead/x", "/nowhere"):
        request = urllib.request.Request(f"{proxy.url}{path}", headers={"Host": "flatrender.test"})
        with contextlib.suppress(urllib.error.HTTPError):  # 404 and 502 are wanted too
            urllib.request.urlopen(request, timeout=10).close()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"NOT HTTP\r\n\r\n")
        s.recv(4096)
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin_port}/metrics", timeout=10) as r:
        text: str = r.read().decode()
    return text


def test_no_series_carries_a_label_prometheus_sets_itself(live_metrics: Exposition) -> None:
    clashing = {
        n: ls & TARGET_LABELS for n, ls in live_metrics.labels.items() if ls & TARGET_LABELS
    }
    assert clashing == {}, "renamed exported_* on every scrape: pick another label name"


@pytest.mark.parametrize(
    ("source", "exprs"),
    [("dashboard", dashboard_exprs()), ("alert rules", rule_exprs())],
)
def test_every_metric_and_label_used_exists(
    live_metrics: Exposition, source: str, exprs: list[str]
) -> None:
    problems = []
    for expr in exprs:
        used = read_promql(expr)
        assert used.metrics, f"{source}: no metric in {expr!r}"
        for name, labels in used.metrics.items():
            if name not in live_metrics.names:
                problems.append(f"{source}: {name} is not in /metrics ({expr})")
                continue
            seen = live_metrics.labels.get(name)
            if seen is not None and labels - seen:
                problems.append(f"{source}: {name} has no label {sorted(labels - seen)} ({expr})")
        on_any = set().union(*(live_metrics.labels.get(n, set()) for n in used.metrics))
        missing = used.grouping - on_any - TARGET_LABELS
        if missing:
            problems.append(f"{source}: no metric of {expr!r} has label {sorted(missing)}")
    assert problems == []
