"""The benchmark: what the proxy costs per core, as ratios measured in one interleaved run.

Starts a throwaway Postgres and Redis, the fast upstream and the proxy; pins the proxy to core 0
and everything else (wrk, the open-loop generator, the upstream, Postgres, Redis) to core 1;
then alternates, round after round, between:

  (a) upstream   the fast upstream directly;
  (f) floor      aiohttp's floor: loadtests/floor_forwarder.py, the barest aiohttp + uvloop
                 forwarder (one handler, one ClientSession, bodies read whole, no log), pinned
                 to the proxy's core;
  (b) plain      the proxy on a route with every feature off (auth "none", no audit);
  (c) full       the full pipeline: custom domain, API key, Redis rate limit, Postgres audit.

and prints the ratios to the floor first (plain/floor b/f, full/floor c/f), then full/plain c/b
and c/a; then req/s and p50/p99 per scenario (wrk, closed loop: median over rounds), Redis
commands per request (INFO commandstats) and audit rows per request in (c).

Then latency under load: (b) and (c), interleaved, at 70%, 50% and 35% of (b)'s measured
saturation throughput, driven by loadtests/openloop.py (open loop: a fixed request rate over
keep-alive connections, latency from each request's scheduled send time, so queueing behind a
stall is counted instead of omitted); p50/p99 over every request of the rounds, and the p99 the
full pipeline adds (c minus b) against its budget (1 ms at 35%, 2 ms at 50%, 1 ms at any other
load). Both phases also report the proxy's CPU time per request (psutil), and the run says so
when other processes used the CPU meanwhile (a test suite alongside disturbs the figures).

With ``--workers N`` (N > 1) a second proxy runs with ``--workers N`` on both cores (not
pinned: its workers share core 1 with wrk, the upstream, Postgres and Redis), and the rounds
interleave (b) and (c) on both proxies, so the report says how throughput scales against one
pinned worker in the same run. The latency part is left out there (``--latency-seconds 0``).

    .venv/bin/python loadtests/bench.py [--seconds 5] [--rounds 3] [--connections 64]
        [--workers 1] [--latency-seconds 5] [--latency-rounds 2] [--load 0.7]...

Absolute numbers drift between runs and machines; the ratios are the result.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import free_port, stop, wait_port, wait_ready  # noqa: E402
from tests.servers import PostgresServer, RedisServer  # noqa: E402

sys.path.insert(0, str(ROOT / "loadtests"))
from openloop import percentile  # noqa: E402

KEY = "fr_live_" + "B" * 40
TENANT = "ffffffff-0000-0000-0000-000000000001"
HOST = "videos.acme.test"
PROXY_CORE, LOAD_CORE = "0", "1"
# The p99 the full pipeline may add over plain forwarding, by share of plain's saturation (1 ms
# at any other load measured).
P99_BUDGET_MS = {0.35: 1.0, 0.5: 2.0}
OPENLOOP_WARMUP_S = 1.0  # each open-loop run starts with this long at its rate, unrecorded


@dataclass
class Result:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_s: float | None = None  # CPU the proxy's processes used during the run

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_us(self) -> float | None:
        return None if self.cpu_s is None else self.cpu_s / self.requests * 1e6


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (a supervisor's
    workers included)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def ensure_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk:
        return wrk
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk from Debian's packages ...", flush=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "wrk"],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        found = shutil.which("wrk")
        if found:
            return found
    sys.exit("bench: wrk is required: apt-get install wrk")


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(wrk: str, url: str, seconds: int, connections: int, headers: list[str]) -> Result:
    headers, script = (
        [h for h in headers if h != POST],
        [a for h in headers if h == POST for a in ("-s", POST_SCRIPT)],
    )
    cmd = [
        "taskset",
        "-c",
        LOAD_CORE,
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        *script,
        *[a for h in headers for a in ("-H", h)],
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    try:
        requests = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).group(1))  # type: ignore[union-attr]
        # anchored: "+/- Stdev" columns such as "84.50%" also end in "50%"
        p50 = _ms(re.search(r"^\s+50%\s+(\S+)\s*$", out, re.M).group(1))  # type: ignore[union-attr]
        p99 = _ms(re.search(r"^\s+99%\s+(\S+)\s*$", out, re.M).group(1))  # type: ignore[union-attr]
    except (AttributeError, ValueError) as exc:
        raise RuntimeError(f"cannot read wrk's output for {url}:\n{out}") from exc
    errors = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    return Result(requests, float(seconds), p50, p99, errors)


def pinned(
    core: str, *cmd: str, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """A process on ``core``; its output goes to ``log`` (or nowhere). Never an unread pipe:
    a full pipe would block the proxy's log writer and hide the cost of writing its log."""
    return subprocess.Popen(
        ["taskset", "-c", core, *cmd],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb") if log else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


@dataclass
class Latency:
    """Open-loop runs of one scenario: every latency (seconds) and the runs' summaries."""

    samples: list[float]
    runs: list[dict[str, float]]
    redis_sent: int = 0  # calls the proxy sent to Redis during these runs (warm-ups included)
    cpu_s: float = 0.0  # CPU the proxy used during these runs (warm-ups included)

    @property
    def cpu_us(self) -> float:
        sent = sum(r["rate"] * (r["seconds"] + OPENLOOP_WARMUP_S) for r in self.runs)
        return self.cpu_s / sent * 1e6

    def pct_ms(self, q: float) -> float:
        return percentile(sorted(self.samples), q) * 1000.0

    @property
    def errors(self) -> int:
        return int(sum(r["errors"] for r in self.runs))

    @property
    def rps(self) -> float:
        return statistics.median(r["achieved_rps"] for r in self.runs)

    @property
    def late_p99_ms(self) -> float:
        return max(r["late_p99_ms"] for r in self.runs)


def run_openloop(
    url: str, headers: list[str], rate: float, seconds: float, connections: int, dump: Path
) -> tuple[dict[str, float], list[float]]:
    cmd = [
        "taskset",
        "-c",
        LOAD_CORE,
        sys.executable,
        str(ROOT / "loadtests" / "openloop.py"),
        "--url",
        url,
        "--rate",
        f"{rate:.1f}",
        "--seconds",
        str(seconds),
        "--connections",
        str(connections),
        "--warmup",
        str(OPENLOOP_WARMUP_S),
        "--dump",
        str(dump),
        *[a for h in headers for a in ("--header", h)],
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
    with dump.open("rb") as f:
        samples = array("d")
        samples.frombytes(f.read())
    return json.loads(out.stdout), list(samples)


async def seed(dsn: str) -> None:
    import asyncpg

    from proxy.migrate import apply_migrations

    await apply_migrations(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO identity.tenants (id, slug, name, status, custom_domain, domain_verified)"
            " VALUES ($1, 'acme', 'Acme', 'Active', $2, true)",
            TENANT,
            HOST,
        )
        await conn.execute(
            "INSERT INTO identity.tenant_api_keys (tenant_id, name, key_prefix, key_hash, last4,"
            " scopes, rate_limit_rpm) VALUES ($1, 'bench', $2, $3, $4, '{*}', 1000000000)",
            TENANT,
            KEY[:12],
            hashlib.sha256(KEY.encode()).hexdigest(),
            KEY[-4:],
        )
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    finally:
        await conn.close()


# -- the render quota's cost: POSTs on a metered route against the same route unmetered ------

POST = "<POST>"  # a pseudo-header of run_wrk: send POSTs (wrk's -s with POST_SCRIPT)
POST_SCRIPT = str(ROOT / "loadtests" / "wrk_post.lua")
METER_ROUTES = (
    '[[routes]]\nprefix = "/v1/unmetered"\nupstream = "fast"\nauth = "api_key"\n'
    'audit = true\nscopes = { POST = "renders:create" }\n'
    '[[routes]]\nprefix = "/v1/metered"\nupstream = "fast"\nauth = "api_key"\n'
    'audit = true\nscopes = { POST = "renders:create" }\nmeter = "renders"\n'
)


async def seed_quota(dsn: str) -> None:
    """A quota the bench never reaches: every metered POST is a Redis reservation and a keep."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "UPDATE identity.tenants SET monthly_render_qty = 2000000000 WHERE id = $1", TENANT
        )
    finally:
        await conn.close()


def add_meter_scenarios(
    scenarios: dict[str, tuple[str, list[str]]],
    owner: dict[str, int],
    ports: dict[str, int],
    pids: dict[str, int],
    full: list[str],
) -> None:
    """(c post) and (c post metered): the full pipeline's POST, without and with the quota;
    named (c ...) so the per-request audit and Redis figures of (c) count them too."""
    suffix = next(iter(ports))
    for name, path in (("c post", "/v1/unmetered/x"), ("c post metered", "/v1/metered/x")):
        scenarios[f"{name}{suffix}"] = (f"http://127.0.0.1:{ports[suffix]}{path}", [*full, POST])
        owner[f"{name}{suffix}"] = pids[suffix]


def report_meter(results: dict[str, list[Result]]) -> None:
    (plain,) = [rs for n, rs in results.items() if n.startswith("c post") and "metered" not in n]
    (metered,) = [rs for n, rs in results.items() if n.startswith("c post metered")]
    ratio = statistics.median(r.rps for r in metered) / statistics.median(r.rps for r in plain)
    cpu = [
        statistics.median(c for r in rs if (c := r.cpu_us) is not None) for rs in (plain, metered)
    ]
    print(
        f"  render quota: metered/unmetered POST throughput = {ratio:.2f} "
        f"(proxy CPU {cpu[1]:.0f} against {cpu[0]:.0f} us/req)"
    )


async def audit_rows(dsn: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM identity.tenant_api_request_logs"))
    finally:
        await conn.close()


async def settled_audit_rows(dsn: str, deadline_s: float = 30.0) -> int:
    """Rows once the proxy's audit queue has drained (the count stops moving)."""
    last, end = -1, time.monotonic() + deadline_s
    while time.monotonic() < end:
        now = await audit_rows(dsn)
        if now == last:
            return now
        last = now
        await asyncio.sleep(1.0)
    return last


def redis_commands(url: str) -> tuple[int, int]:
    """(calls the proxy sent, every command Redis executed, the script's own included),
    from INFO commandstats, leaving out the benchmark's own INFO/CONFIG."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    own = ("cmdstat_info", "cmdstat_config", "cmdstat_config|resetstat")
    calls = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_script|load", "cmdstat_ping")
    sent = sum(int(v["calls"]) for k, v in stats.items() if k in calls)
    executed = sum(int(v["calls"]) for k, v in stats.items() if k not in own)
    return sent, executed


class ForeignLoad:
    """Samples, every ``interval_s``, the CPU used by processes outside the benchmark's own tree
    (a test suite running alongside, say), so a disturbed run says so instead of misleading."""

    def __init__(self, interval_s: float = 2.0) -> None:
        import threading

        self.interval_s = interval_s
        self.seconds: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="foreign-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        last: dict[int, float] = {}
        while not self._stop.wait(self.interval_s):
            ours = {me.pid} | {c.pid for c in me.children(recursive=True)}
            now: dict[int, float] = {}
            for proc in psutil.process_iter(["pid", "name", "cpu_times"]):
                times = proc.info["cpu_times"]
                if times is None or proc.info["pid"] in ours:
                    continue
                now[proc.info["pid"]] = used = times.user + times.system
                delta = used - last.get(proc.info["pid"], used)
                if delta > 0.05 * self.interval_s:
                    name = proc.info["name"] or "?"
                    self.seconds[name] = self.seconds.get(name, 0.0) + delta
            last = now

    def warning(self) -> str | None:
        total = sum(self.seconds.values())
        if total < 1.0:
            return None
        top = sorted(self.seconds.items(), key=lambda kv: -kv[1])[:4]
        names = ", ".join(f"{n} {s:.0f}s" for n, s in top)
        return (
            f"  WARNING: other processes used {total:.0f} CPU-seconds during the run "
            f"({names}): the figures are disturbed"
        )


def start_proxy(
    cores: str, workers: int, config: Path, env: dict[str, str], log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port, admin = free_port(), free_port()
    proc = pinned(
        cores,
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(config),
        "--listen",
        f"127.0.0.1:{port}",
        "--admin-listen",
        f"127.0.0.1:{admin}",
        *(["--workers", str(workers)] if workers > 1 else []),
        env=env,
        log=log,
    )
    wait_port(port, proc)
    wait_ready(admin)
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--latency-seconds", type=float, default=None)
    parser.add_argument("--latency-rounds", type=int, default=2)
    parser.add_argument(
        "--load",
        type=float,
        action="append",
        help="share of (b)'s saturation for the latency runs (repeatable; default 0.7, 0.5, 0.35)",
    )
    args = parser.parse_args()
    if args.latency_seconds is None:
        args.latency_seconds = 5.0 if args.workers == 1 else 0.0
    args.load = sorted(set(args.load or [0.7, 0.5, 0.35]), reverse=True)
    if not all(0 < load < 1 for load in args.load):
        parser.error("--load is a share of saturation, between 0 and 1")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("bench: needs two cores (the proxy on one, the load and servers on the other)")
    wrk = ensure_wrk()
    # Postgres, Redis and everything else started from here inherit core 1.
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    py = sys.executable
    pg, rd = PostgresServer(), RedisServer()
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    try:
        pg.start()
        rd.start()
        dsn = pg.create_database("bench")
        asyncio.run(seed(dsn))
        asyncio.run(seed_quota(dsn))
        up_port = free_port()
        upstream = pinned(LOAD_CORE, py, "loadtests/fast_upstream.py", "--port", str(up_port))
        procs.append(upstream)
        wait_port(up_port, upstream)
        floor_port = free_port()
        floor = pinned(
            PROXY_CORE,
            py,
            "loadtests/floor_forwarder.py",
            "--port",
            str(floor_port),
            "--upstream",
            f"http://127.0.0.1:{up_port}",
        )
        procs.append(floor)
        wait_port(floor_port, floor)
        config = tmp / "edge.toml"
        config.write_text(
            f'[server]\nmax_body_bytes = 1048576\n[tenancy]\nplatform_domains = ["bench.test"]\n'
            f'[audit]\nspool_dir = "{tmp / "spool"}"\n'
            f'[upstreams.fast]\nurls = ["http://127.0.0.1:{up_port}"]\n'
            '[[routes]]\nprefix = "/plain"\nupstream = "fast"\nauth = "none"\n'
            '[[routes]]\nprefix = "/v1/renders"\nupstream = "fast"\nauth = "api_key"\n'
            'audit = true\nscopes = { GET = "renders:read" }\n' + METER_ROUTES
        )
        env = {**os.environ, "DATABASE_URL": dsn, "REDIS_URL": rd.url}
        # The proxy's access log (on by default) goes to a file, as a drained log would.
        proxy, port = start_proxy(PROXY_CORE, 1, config, env, tmp / "proxy.log")
        procs.append(proxy)
        ports = {"": port}  # scenario-name suffix -> proxy port
        pids = {"": proxy.pid}
        if args.workers > 1:
            multi, multi_port = start_proxy(
                "0,1", args.workers, config, env, tmp / "proxy-multi.log"
            )
            procs.append(multi)
            ports = {" 1w": port, f" {args.workers}w": multi_port}
            pids = {" 1w": proxy.pid, f" {args.workers}w": multi.pid}
        owner: dict[str, int] = {}  # scenario -> pid of the process serving it (proxy or floor)
        full = [f"Host: {HOST}", f"X-API-Key: {KEY}"]
        scenarios = {
            "a upstream": (f"http://127.0.0.1:{up_port}/plain/x", []),
            "f floor": (f"http://127.0.0.1:{floor_port}/plain/x", [f"Host: {HOST}"]),
        }
        owner["f floor"] = floor.pid
        for suffix, p in ports.items():
            scenarios[f"b plain{suffix}"] = (f"http://127.0.0.1:{p}/plain/x", [f"Host: {HOST}"])
            scenarios[f"c full{suffix}"] = (f"http://127.0.0.1:{p}/v1/renders/x", full)
            owner[f"b plain{suffix}"] = owner[f"c full{suffix}"] = pids[suffix]
        add_meter_scenarios(scenarios, owner, ports, pids, full)
        foreign = ForeignLoad()
        foreign.start()
        for url, headers in scenarios.values():  # warm-up: caches, pools
            run_wrk(wrk, url, 1, args.connections, headers)
        rows_before, cmds_before = asyncio.run(settled_audit_rows(dsn)), redis_commands(rd.url)
        results: dict[str, list[Result]] = {name: [] for name in scenarios}
        for _ in range(args.rounds):
            for name, (url, headers) in scenarios.items():
                cpu_before = process_cpu_s(owner[name]) if name in owner else 0.0
                result = run_wrk(wrk, url, args.seconds, args.connections, headers)
                if name in owner:
                    result.cpu_s = process_cpu_s(owner[name]) - cpu_before
                results[name].append(result)
        full_requests = sum(r.requests for n, rs in results.items() if n[0] == "c" for r in rs)
        rows = asyncio.run(settled_audit_rows(dsn)) - rows_before
        sent, executed = (a - b for a, b in zip(redis_commands(rd.url), cmds_before, strict=True))
        # load share -> scenario -> open-loop runs; the loads interleave within each round too
        latency: dict[float, dict[str, Latency]] = {}
        first = next(iter(ports))
        saturation = statistics.median(r.rps for r in results[f"b plain{first}"])
        if args.latency_seconds > 0:
            latency = {
                load: {n: Latency([], []) for n in (f"b plain{first}", f"c full{first}")}
                for load in args.load
            }
            for _ in range(args.latency_rounds):
                for load, by_name in latency.items():
                    for name, lat in by_name.items():
                        url, headers = scenarios[name]
                        before = redis_commands(rd.url)[0]
                        cpu_before = process_cpu_s(owner[name])
                        summary, samples = run_openloop(
                            url,
                            headers,
                            load * saturation,
                            args.latency_seconds,
                            args.connections,
                            tmp / "lat",
                        )
                        lat.redis_sent += redis_commands(rd.url)[0] - before
                        lat.cpu_s += process_cpu_s(owner[name]) - cpu_before
                        lat.runs.append(summary)
                        lat.samples.extend(samples)
        foreign.stop()
        report(
            results,
            args,
            rows / full_requests,
            sent / full_requests,
            executed / full_requests,
            latency,
        )
        report_meter(results)
        if warning := foreign.warning():
            print(warning)
    finally:
        for p in procs:
            stop(p)
        pg.cleanup()
        rd.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def report(
    results: dict[str, list[Result]],
    args: argparse.Namespace,
    audit_per_request: float,
    redis_sent: float,
    redis_executed: float,
    latency: dict[float, dict[str, Latency]],
) -> None:
    med = {n: statistics.median(r.rps for r in rs) for n, rs in results.items()}
    multi = args.workers > 1
    where = (
        f"one proxy with 1 worker on core {PROXY_CORE} and one with --workers {args.workers} "
        "on both cores (unpinned: its workers share core 1 with the load)"
        if multi
        else f"proxy on core {PROXY_CORE}"
    )
    print(
        f"\nflatrender-edge bench: {args.rounds} interleaved rounds x {args.seconds}s, "
        f"{args.connections} connections, proxy workers={args.workers} ({where}; "
        f"wrk, upstream, Postgres and Redis on core {LOAD_CORE})"
    )
    if multi:
        n = f"{args.workers}w"
        print(f"  scaling {n}/1w: plain (b) = {med[f'b plain {n}'] / med['b plain 1w']:.2f}x")
        print(f"  scaling {n}/1w: full (c) = {med[f'c full {n}'] / med['c full 1w']:.2f}x")
    for suffix in (" 1w", f" {args.workers}w") if multi else ("",):
        b, c = med[f"b plain{suffix}"], med[f"c full{suffix}"]
        if not multi or suffix == " 1w":  # the floor is one pinned process
            print(f"  plain/floor (b/f){suffix} = {b / med['f floor']:.2f}")
            print(f"  full/floor (c/f){suffix} = {c / med['f floor']:.2f}")
        print(f"  full/plain (c/b){suffix} = {c / b:.2f}")
        print(f"  full/upstream (c/a){suffix} = {c / med['a upstream']:.2f}")
        print(f"  plain/upstream (b/a){suffix} = {b / med['a upstream']:.2f}")
    if not multi:  # the same ratios from CPU time per request, which a busy machine moves less
        cpu = {
            n: statistics.median(c for r in rs if (c := r.cpu_us) is not None)
            for n, rs in results.items()
            if n[0] in "fbc"
        }
        print(
            f"  by CPU per request: plain/floor = {cpu['f floor'] / cpu['b plain']:.2f}, "
            f"full/floor = {cpu['f floor'] / cpu['c full']:.2f}, "
            f"full/plain = {cpu['b plain'] / cpu['c full']:.2f}"
        )
    within: list[float] = []
    for load, by_name in latency.items():
        b_lat, c_lat = by_name.values()
        added = c_lat.pct_ms(99) - b_lat.pct_ms(99)
        budget = P99_BUDGET_MS.get(load, 1.0)
        verdict = "within" if added <= budget else "OVER"
        if added <= budget:
            within.append(load)
        print(
            f"  added p99 at {load:.0%} of plain's saturation (c - b) = {added:+.2f} ms "
            f"(budget {budget:g} ms: {verdict})"
        )
    if latency:
        # The loads are measured from the highest down; the budgets hold up to the highest load
        # from which every lower one held too.
        loads = list(latency)
        held = [load for i, load in enumerate(loads) if all(x in within for x in loads[i:])]
        print(
            "  the p99 budgets hold up to "
            + (f"{held[0]:.0%} of plain's saturation" if held else "none of the loads measured")
        )
    print(
        f"  Redis calls per request (c) = {redis_sent:.3f} sent by the proxy, "
        f"{redis_executed:.3f} executed by Redis (the Lua script's own commands included)"
    )
    for load, by_name in latency.items():
        c_lat = list(by_name.values())[1]
        total = sum(r["rate"] * (r["seconds"] + OPENLOOP_WARMUP_S) for r in c_lat.runs)
        print(
            f"  Redis calls per request (c, open loop at {load:.0%}) = "
            f"{c_lat.redis_sent / total:.3f} sent by the proxy"
        )
    print(f"  audit rows per request (c) = {audit_per_request:.3f}")
    print("  throughput (wrk, closed loop, median of rounds):")
    print(
        f"  {'scenario':<15} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
        f"{'proxy CPU us/req':>17}"
    )
    for name, rs in results.items():
        cpus = [c for r in rs if (c := r.cpu_us) is not None]
        cpu = f"{statistics.median(cpus):>17.0f}" if cpus else f"{'-':>17}"
        print(
            f"  {name:<15} {med[name]:>9.0f} "
            f"{statistics.median(r.p50_ms for r in rs):>8.2f} "
            f"{statistics.median(r.p99_ms for r in rs):>8.2f} {sum(r.errors for r in rs):>7} {cpu}"
        )
    if latency:
        bname = next(iter(next(iter(latency.values()))))
        print(
            f"  latency under load (open loop, {args.latency_rounds} interleaved rounds x "
            f"{args.latency_seconds:g}s, {args.connections} connections, from each request's "
            f"scheduled send; load = share of {bname}'s {med[bname]:.0f} req/s):"
        )
        print(
            f"  {'scenario':<15} {'load':>5} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'p99.9 ms':>9} {'errors':>7} {'sent late p99 ms':>17} {'proxy CPU us/req':>17}"
        )
        for load, by_name in latency.items():
            for name, lat in by_name.items():
                print(
                    f"  {name:<15} {load:>5.0%} {lat.rps:>7.0f} {lat.pct_ms(50):>8.2f} "
                    f"{lat.pct_ms(99):>8.2f} {lat.pct_ms(99.9):>9.2f} {lat.errors:>7} "
                    f"{lat.late_p99_ms:>17.2f} {lat.cpu_us:>17.0f}"
                )


if __name__ == "__main__":
    main()
