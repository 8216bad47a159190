"""The load-test scripts without any load: the locust run's end-of-run verdict
(loadtests/loadcheck.py) as a pure function over per-key counts, the driver's plan and audit
check, the open-loop generator's parsing and percentiles, and every loadtests/*.py compiling and
importing (no server is started, nothing touches the network)."""

from __future__ import annotations

import importlib.util
import py_compile
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
LOADTESTS = ROOT / "loadtests"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"loadtests_{name}", LOADTESTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


loadcheck = _load("loadcheck")
KeyStats, RunStats, check = loadcheck.KeyStats, loadcheck.RunStats, loadcheck.check


def _key(rpm: int, over: bool, admitted: int, limited: int, span_s: float) -> object:
    """A key whose requests were all answered, ``admitted`` 200s then ``limited`` 429s."""
    k = KeyStats(rpm, over)
    k.record_sent(100.0)
    for _ in range(admitted + limited - 1):
        k.record_sent(100.0 + span_s / 2)
    for i in range(admitted + limited):
        status = 200 if i < admitted else 429
        k.record_answer(status, 100.0 + span_s, str(rpm), "1" if status == 429 else None)
    return k


def _run(**keys: object) -> object:
    return RunStats(keys=dict(keys), statuses=Counter({200: 10, 429: 3}))


# -- the verdict ---------------------------------------------------------------------------------


def test_a_consistent_run_passes() -> None:
    # rpm 60 over 30 s allows 60 + 30 = 90; a big key far from its limit never saw a 429
    run = _run(over=_key(60, True, 90, 200, 30.0), big=_key(6000, False, 500, 0, 30.0))
    assert check(run) == []


def test_any_5xx_fails() -> None:
    run = _run(over=_key(60, True, 90, 10, 30.0))
    run.statuses[502] += 2
    run.statuses[500] += 1
    (failure,) = check(run)
    assert "3 responses were 5xx" in failure and "502: 2" in failure


def test_requests_without_an_answer_fail() -> None:
    run = _run()
    run.transport_errors = 4
    assert check(run) == ["4 requests failed without an HTTP answer"]


def test_over_limit_key_without_429_fails() -> None:
    (failure,) = check(_run(over=_key(600, True, 300, 0, 30.0)))
    assert "over" in failure and "never got a 429" in failure


def test_a_key_within_its_limit_need_not_see_429() -> None:
    assert check(_run(calm=_key(600, False, 300, 0, 30.0))) == []


def test_more_admissions_than_the_bucket_allows_fails() -> None:
    # rpm 60 for 30 s: 60 + 1/s x 30 = 90 at most
    (failure,) = check(_run(over=_key(60, True, 91, 50, 30.0)))
    assert "91 requests admitted" in failure and "(90.0)" in failure


def test_the_allowance_grows_with_the_span() -> None:
    assert check(_run(over=_key(60, True, 120, 50, 60.0))) == []  # 60 + 60 = 120
    assert check(_run(over=_key(60, True, 121, 50, 60.0)))


def test_429_before_the_burst_was_spent_fails() -> None:
    (failure,) = check(_run(early=_key(100, False, 40, 5, 30.0)))
    assert "after only 40 admitted" in failure


def test_unknown_outcomes_may_have_spent_the_burst() -> None:
    key = _key(100, True, 95, 5, 30.0)
    for _ in range(5):  # cut at the stop: sent, never answered
        key.record_sent(110.0)
    assert key.unknown == 5
    assert check(_run(k=key)) == []


def test_wrong_rate_limit_headers_fail() -> None:
    key = KeyStats(60, True)
    key.record_sent(0.0)
    key.record_answer(200, 1.0, "600", None)  # another key's limit
    key.record_sent(1.0)
    key.record_answer(429, 2.0, "60", None)  # 429 without Retry-After
    key.record_sent(2.0)
    key.record_answer(429, 3.0, "60", "0")  # Retry-After must be at least 1
    assert key.bad_headers == 3
    assert any("X-RateLimit-Limit" in f for f in check(_run(k=key)))


def test_auth_refusals_take_no_token_and_are_not_admissions() -> None:
    key = KeyStats(60)
    for status in (401, 403, 200, 429):
        key.record_sent(0.0)
        key.record_answer(status, 1.0, "60", "1")
    assert (key.admitted, key.limited, key.refused, key.unknown) == (1, 1, 2, 0)


def test_an_admitted_bad_key_fails() -> None:
    run = _run()
    run.bad_key_requests, run.bad_key_admitted = 50, 1
    (failure,) = check(run)
    assert "1 of 50 requests with a bad key" in failure


def test_results_survive_json() -> None:
    run = _run(over=_key(60, True, 90, 200, 30.0), big=_key(6000, False, 500, 0, 30.0))
    run.transport_errors, run.bad_key_requests = 1, 7
    again = RunStats.from_json(run.to_json())
    assert again.to_json() == run.to_json()
    assert check(again) == check(run)


# -- the driver (loadtests/loadtest.py) ----------------------------------------------------------


def test_the_plan_has_every_kind_of_traffic() -> None:
    loadtest = _load("loadtest")
    plan = loadtest.build_plan()
    keys, tenants = plan["keys"], {t["slug"]: t for t in plan["tenants"]}
    assert len(tenants) >= 3
    assert any(t["custom_domain"] for t in tenants.values())
    assert any(not t["custom_domain"] for t in tenants.values())
    assert len({k["key"] for k in keys}) == len(keys) == len({k["id"] for k in keys})
    assert all(k["key"].startswith("fr_live_") and len(k["key"]) == 48 for k in keys)
    for slug, t in tenants.items():
        mine = [k for k in keys if k["tenant"] == slug]
        assert len(mine) >= 2
        assert any(not k["over_limit"] for k in mine)  # the studio needs one
        assert f"{slug}.{plan['platform_domain']}" in t["hosts"]
    assert len({k["rpm"] for k in keys}) == len(keys)
    assert sum(k["over_limit"] for k in keys) >= 2
    assert {b["expect"] for b in plan["bad_keys"]} == {401, 403}
    known = {k["key"] for k in keys}
    assert sum(b["key"] in known for b in plan["bad_keys"]) == 1  # another tenant's key


def test_studio_origins_are_allowed_by_their_tenant() -> None:
    from proxy.core.cors import build_policy

    loadtest = _load("loadtest")
    for t in loadtest.build_plan()["tenants"]:
        policy = build_policy(t["allowed_origins"], t["custom_domain"])
        assert all(policy.allows(origin) for origin in t["origins"]), t["slug"]
        assert not policy.allows("https://studio.not-a-reseller.test")  # the foreign preflight


def test_audit_check_uses_the_whole_run() -> None:
    loadtest = _load("loadtest")
    plan = {"keys": [{"id": "k1", "name": "k", "rpm": 60}]}
    ok = {"k1": {200: 90, 429: 400, 401: 3}}
    assert loadtest.audit_failures(plan, ok, {200: 90, 429: 400}, 30.0) == []
    over = {"k1": {200: 85, 502: 6}}
    failures = loadtest.audit_failures(plan, over, {200: 85, 502: 6}, 30.0)
    assert len(failures) == 2
    assert "5xx" in failures[0] and "91 admitted rows" in failures[1]


# -- the open-loop generator (loadtests/openloop.py) ---------------------------------------------


def test_percentiles_are_nearest_rank() -> None:
    openloop = _load("openloop")
    values = [float(v) for v in range(1, 101)]
    assert openloop.percentile(values, 50) == 50.0
    assert openloop.percentile(values, 99) == 99.0
    assert openloop.percentile(values, 99.9) == 100.0
    assert openloop.percentile([], 99) == 0.0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", (200, 40)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1", (200, 40)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok", None),
        (b"HTTP/1.1 200 OK\r\nContent-Le", None),
        (b"HTTP/1.1 429 Too Many\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", None),
        (b"HTTP/1.1 204 No Content\r\nVary: Origin\r\n\r\n", (204, 41)),
    ],
)
def test_responses_are_framed(raw: bytes, expected: tuple[int, int] | None) -> None:
    openloop = _load("openloop")
    if raw.startswith(b"HTTP/1.1 429"):
        expected = (429, len(raw))
    assert openloop.response_end(bytearray(raw)) == expected


def test_an_incomplete_chunked_body_waits() -> None:
    openloop = _load("openloop")
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"
    assert openloop.response_end(raw) is None


# -- bench_scale: the keys it rebuilds, the bound it checks, the line it ends with ---------------


def test_bench_scale_keys_are_well_formed_realistic_and_reproducible() -> None:
    bench_scale = _load("bench_scale")
    keys = [bench_scale.key_for("salt", i) for i in range(2000)]
    assert all(re.fullmatch(r"fr_live_[A-Za-z0-9]{32}", k) for k in keys)
    assert keys == [bench_scale.key_for("salt", i) for i in range(2000)]
    assert bench_scale.key_for("other", 0) != keys[0]
    # Realistic prefixes: one key each, nearly always (4 random base62 characters).
    assert len({k[:12] for k in keys}) >= 1990


def test_bench_scale_write_bound_and_line() -> None:
    bench_scale = _load("bench_scale")
    # A usage write per key per 10 s, a daily-usage upsert per tenant per 500 ms batch.
    assert bench_scale.writes_bound(1000, 1000) == 2100
    line = bench_scale.scale_line(
        cold_warm=0.834,
        warm_p99_ratio=1.26,
        gc_pause_max_ms=12.34,
        rss_per_entry_b=812.4,
        pg_writes_per_s=1433.2,
        flood_rss_growth_mb=3.21,
    )
    assert line == (
        "SCALE cold_warm=0.83 warm_p99_ratio=1.26 gc_pause_max_ms=12.3 rss_per_entry_b=812"
        " pg_writes_per_s=1433 flood_rss_growth_mb=3.2"
    )


def test_bench_scale_longest_gc_pause_between_two_readings() -> None:
    bench_scale = _load("bench_scale")
    inf = float("inf")
    before = {0.001: 5.0, 0.01: 7.0, 0.02: 7.0, inf: 7.0}
    # Since: 4 collections of at most 1 ms, 1 of 1-10 ms, 1 of 10-20 ms.
    after = {0.001: 9.0, 0.01: 12.0, 0.02: 13.0, inf: 13.0}
    assert bench_scale.longest_between(before, after) == 0.02
    assert bench_scale.longest_between(before, before) == 0.0
    assert bench_scale.longest_between(before, {**after, inf: 14.0}) == inf


# -- every script compiles and imports -----------------------------------------------------------

SCRIPTS = sorted(p.name for p in LOADTESTS.glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_compiles(name: str, tmp_path: Path) -> None:
    py_compile.compile(str(LOADTESTS / name), cfile=str(tmp_path / "x.pyc"), doraise=True)


@pytest.mark.parametrize("name", [n for n in SCRIPTS if n != "locustfile.py"])
def test_script_imports_without_running(name: str) -> None:
    module = _load(name.removesuffix(".py"))
    assert callable(getattr(module, "main", None)) or name == "loadcheck.py"


def test_locustfile_imports_without_a_plan() -> None:
    """In a subprocess: locust monkey-patches the standard library with gevent on import."""
    if importlib.util.find_spec("locust") is None:  # not importorskip: that would patch us
        pytest.skip("the `load` extra (locust) is not installed")
    code = (
        "import runpy, sys; sys.argv = ['locust'];"
        f"ns = runpy.run_path({str(LOADTESTS / 'locustfile.py')!r});"
        "assert ns['GreedyClient'].fixed_count == 0 and not ns['PLAN']['keys']"
    )
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
