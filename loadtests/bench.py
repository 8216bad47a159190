"""The benchmark: what the proxy costs per core, as ratios measured in one interleaved run.

Starts a throwaway Postgres and Redis, the fast upstream and the proxy; pins the proxy to core 0
and everything else (wrk, upstream, Postgres, Redis) to core 1; then alternates, round after
round, between:

  (a) upstream   the fast upstream directly;
  (b) plain      the proxy on a route with every feature off (auth "none", no audit);
  (c) full       the full pipeline: custom domain, API key, Redis rate limit, Postgres audit.

and prints req/s and p50/p99 per scenario (median over rounds), the ratios c/b and c/a, Redis
commands per request (INFO commandstats) and audit rows per request in (c).

    .venv/bin/python loadtests/bench.py [--seconds 5] [--rounds 3] [--connections 64]
                                        [--workers 1]

Absolute numbers drift between runs and machines; the ratios are the result.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import free_port, stop, wait_port, wait_ready  # noqa: E402
from tests.servers import PostgresServer, RedisServer  # noqa: E402

KEY = "fr_live_" + "B" * 40
TENANT = "ffffffff-0000-0000-0000-000000000001"
HOST = "videos.acme.test"
PROXY_CORE, LOAD_CORE = "0", "1"


@dataclass
class Result:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


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
    cmd = [
        "taskset",
        "-c",
        LOAD_CORE,
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        *[a for h in headers for a in ("-H", h)],
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    return Result(requests, float(seconds), p50, p99, errors)


def pinned(core: str, *cmd: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["taskset", "-c", core, *cmd],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    wrk = ensure_wrk()
    py = sys.executable
    pg, rd = PostgresServer(), RedisServer()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        pg.start()
        rd.start()
        dsn = pg.create_database("bench")
        asyncio.run(seed(dsn))
        up_port = free_port()
        upstream = pinned(LOAD_CORE, py, "loadtests/fast_upstream.py", "--port", str(up_port))
        procs.append(upstream)
        wait_port(up_port, upstream)
        tmp = Path(tempfile.mkdtemp(prefix="edge-bench-"))
        config = tmp / "edge.toml"
        config.write_text(
            f'[server]\nmax_body_bytes = 1048576\n[tenancy]\nplatform_domains = ["bench.test"]\n'
            f'[audit]\nspool_dir = "{tmp / "spool"}"\n'
            f'[upstreams.fast]\nurls = ["http://127.0.0.1:{up_port}"]\n'
            '[[routes]]\nprefix = "/plain"\nupstream = "fast"\nauth = "none"\n'
            '[[routes]]\nprefix = "/v1/renders"\nupstream = "fast"\nauth = "api_key"\n'
            'audit = true\nscopes = { GET = "renders:read" }\n'
        )
        port, admin = free_port(), free_port()
        env = {**os.environ, "DATABASE_URL": dsn, "REDIS_URL": rd.url}
        proxy = pinned(
            PROXY_CORE if args.workers == 1 else "0,1",
            py,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin}",
            *(["--workers", str(args.workers)] if args.workers > 1 else []),
            env=env,
        )
        procs.append(proxy)
        wait_port(port, proxy)
        wait_ready(admin)
        scenarios = {
            "a upstream": (f"http://127.0.0.1:{up_port}/plain/x", []),
            "b plain": (f"http://127.0.0.1:{port}/plain/x", [f"Host: {HOST}"]),
            "c full": (
                f"http://127.0.0.1:{port}/v1/renders/x",
                [f"Host: {HOST}", f"X-API-Key: {KEY}"],
            ),
        }
        for url, headers in scenarios.values():  # warm-up: caches, pools, JIT-free but still
            run_wrk(wrk, url, 1, args.connections, headers)
        rows_before, cmds_before = asyncio.run(settled_audit_rows(dsn)), redis_commands(rd.url)
        results: dict[str, list[Result]] = {name: [] for name in scenarios}
        for _ in range(args.rounds):
            for name, (url, headers) in scenarios.items():
                results[name].append(run_wrk(wrk, url, args.seconds, args.connections, headers))
        full_requests = sum(r.requests for r in results["c full"])
        rows = asyncio.run(settled_audit_rows(dsn)) - rows_before
        sent, executed = (a - b for a, b in zip(redis_commands(rd.url), cmds_before, strict=True))
        report(results, args, rows / full_requests, sent / full_requests, executed / full_requests)
    finally:
        for p in procs:
            stop(p)
        pg.cleanup()
        rd.cleanup()


def report(
    results: dict[str, list[Result]],
    args: argparse.Namespace,
    audit_per_request: float,
    redis_sent: float,
    redis_executed: float,
) -> None:
    med = {n: statistics.median(r.rps for r in rs) for n, rs in results.items()}
    print(
        f"\nflatrender-edge bench: {args.rounds} interleaved rounds x {args.seconds}s, "
        f"{args.connections} connections, proxy workers={args.workers} "
        f"(proxy on core {PROXY_CORE if args.workers == 1 else '0,1'}, load on core {LOAD_CORE})"
    )
    print(f"  full/plain (c/b) = {med['c full'] / med['b plain']:.2f}")
    print(f"  full/upstream (c/a) = {med['c full'] / med['a upstream']:.2f}")
    print(f"  plain/upstream (b/a) = {med['b plain'] / med['a upstream']:.2f}")
    print(
        f"  Redis calls per request (c) = {redis_sent:.3f} sent by the proxy, "
        f"{redis_executed:.3f} executed by Redis (the Lua script's own commands included)"
    )
    print(f"  audit rows per request (c) = {audit_per_request:.3f}")
    print(f"  {'scenario':<12} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, rs in results.items():
        print(
            f"  {name:<12} {med[name]:>9.0f} "
            f"{statistics.median(r.p50_ms for r in rs):>8.2f} "
            f"{statistics.median(r.p99_ms for r in rs):>8.2f} {sum(r.errors for r in rs):>7}"
        )


if __name__ == "__main__":
    main()
