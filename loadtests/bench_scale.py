"""Scale benchmark: does the cost of a request stay flat as tenants, keys and traffic grow?

``make bench-scale`` (a few minutes). It starts a throwaway Postgres (tests/servers.py) and
Redis, seeds ``--tenants`` tenants (default 100,000) with ``--keys-per-tenant`` keys each
(default 10: 1,000,000) by SQL, the keys ``fr_live_`` + 32 pseudo-random base62 characters
(base64 of SHA-256 over a per-run salt and the key's number, ``+/`` mapped into the alphabet,
so the bench can rebuild any key without storing a million of them), then runs the proxy in
database mode pinned to core 0, and everything else (this driver's load, the upstream,
Postgres, Redis) on core 1. Requests are ``GET /v1/renders/x`` on ``<slug>.scale.test`` with
the tenant's key (an audited, keyed route: tenant, key, limiter, audit row, usage).

Phases, on proxy A unless said:

1. warm: ``--warm-tenants`` (1,000) tenants, one key each, closed loop: req/s;
2. cold: every tenant once, in random order, with a key not used before: req/s (cold/warm);
3. latency: warm traffic paced at ``--rate-share`` of warm saturation, alternating between A,
   whose caches have now seen every tenant, and B, a fresh process that has seen only the warm
   tenants: p99 of each and their ratio;
4. Postgres: queries (pg_stat_statements) and row writes per second (pg_stat_user_tables of
   ``tenant_api_keys`` and ``tenant_usage_daily``; the audit log's one row per request is
   counted apart) during A's paced warm traffic;
5. flood: ``--flood-seconds`` (30) of wrong keys on real prefixes, random unknown prefixes and
   unknown hosts (random slugs and random domains) against A: its RSS growth.

The longest GC pause is A's longest collection while serving (``edge_gc_pause_seconds``
between /readyz turning 200 and the end, to the histogram's bucket); RSS per cached
entry is A's RSS after the cold pass, less that of a proxy with nothing cached, divided by the
tenants and prefixes (with their keys) it cached. It
ends with one line::

    SCALE cold_warm=<x> warm_p99_ratio=<full cache / fresh> gc_pause_max_ms=<n> \
rss_per_entry_b=<n> pg_writes_per_s=<n> flood_rss_growth_mb=<n>

    .venv/bin/python loadtests/bench_scale.py [--tenants 100000] [--flood-seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import random
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtests"))

from openloop import percentile, response_end  # noqa: E402

from tests.procs import free_port, stop, wait_port, wait_ready  # noqa: E402
from tests.servers import PostgresServer, RedisServer  # noqa: E402

PROXY_CORE, LOAD_CORE = "0", "1"
DOMAIN = "scale.test"
TENANT_ID = "10000000-0000-0000-0000-{:012x}"
_TO_BASE62 = str.maketrans("+/", "xY")


# -- pure parts (tests/unit/test_loadtests.py) ---------------------------------------------------


def key_for(salt: str, i: int) -> str:
    """Key number ``i``: what SEED_KEYS computes in SQL for the same salt."""
    digest = hashlib.sha256(f"{salt}{i}".encode()).digest()
    return "fr_live_" + base64.b64encode(digest).decode()[:32].translate(_TO_BASE62)


def slug_for(t: int) -> str:
    return f"s{t:06d}"


def writes_bound(active_keys: int, active_tenants: int) -> float:
    """Row writes per second the tenant and key tables may take: a usage write per key per
    10 s flush, a ``tenant_usage_daily`` upsert per tenant per 500 ms audit batch."""
    return active_keys / 10 + active_tenants / 0.5


def scale_line(
    *,
    cold_warm: float,
    warm_p99_ratio: float,
    gc_pause_max_ms: float,
    rss_per_entry_b: float,
    pg_writes_per_s: float,
    flood_rss_growth_mb: float,
) -> str:
    return (
        f"SCALE cold_warm={cold_warm:.2f} warm_p99_ratio={warm_p99_ratio:.2f}"
        f" gc_pause_max_ms={gc_pause_max_ms:.1f} rss_per_entry_b={rss_per_entry_b:.0f}"
        f" pg_writes_per_s={pg_writes_per_s:.0f} flood_rss_growth_mb={flood_rss_growth_mb:.1f}"
    )


# -- seeding -------------------------------------------------------------------------------------

SEED_TENANTS = """
INSERT INTO identity.tenants (id, slug, name, status)
SELECT ('10000000-0000-0000-0000-' || lpad(to_hex(i), 12, '0'))::uuid,
       's' || lpad(i::text, 6, '0'), 'Scale ' || i, 'Active'
  FROM generate_series(0, $1 - 1) i
"""
SEED_KEYS = """
INSERT INTO identity.tenant_api_keys
       (tenant_id, name, environment, key_prefix, key_hash, last4, scopes, rate_limit_rpm)
SELECT ('10000000-0000-0000-0000-' || lpad(to_hex(i / $1), 12, '0'))::uuid, 'k' || i, 'Live',
       left(k, 12), encode(sha256(convert_to(k, 'UTF8')), 'hex'), right(k, 4),
       '{renders:read}', 1000000
  FROM (SELECT i, 'fr_live_' || translate(substr(encode(
                   sha256(convert_to($2 || i::text, 'UTF8')), 'base64'), 1, 32), '+/', 'xY') AS k
          FROM generate_series($3::bigint, $4::bigint - 1) i) keys
"""


async def seed(dsn: str, tenants: int, per_tenant: int, salt: str) -> float:
    import asyncpg

    from proxy.migrate import apply_migrations

    started = time.monotonic()
    await apply_migrations(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        # Bulk rows: no NOTIFY per row (nobody listens yet) and no per-row FK checks (the ids
        # are consistent by construction).
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(SEED_TENANTS, tenants)
        total, step = tenants * per_tenant, 200_000
        for start in range(0, total, step):
            await conn.execute(SEED_KEYS, per_tenant, salt, start, min(start + step, total))
            print(f"  seeded {min(start + step, total):,} of {total:,} keys", flush=True)
        await conn.execute("RESET session_replication_role")
        await conn.execute("VACUUM ANALYZE identity.tenants")
        await conn.execute("VACUUM ANALYZE identity.tenant_api_keys")
    finally:
        await conn.close()
    return time.monotonic() - started


# -- load ----------------------------------------------------------------------------------------


@dataclass
class Run:
    sent: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def p99_ms(self) -> float:
        return percentile(sorted(self.latencies), 99) * 1000


Target = tuple[str, str]  # (Host, key)


async def _connection(
    port: int, next_target: Callable[[], Target | None], run: Run, due: asyncio.Queue[float] | None
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    buf = bytearray()
    try:
        while True:
            if due is not None:
                start = await due.get()
            target = next_target()
            if target is None:
                return
            if due is None:
                start = time.perf_counter()
            host, key = target
            writer.write(
                f"GET /v1/renders/x HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\n\r\n".encode()
            )
            run.sent += 1
            while (end := response_end(buf)) is None:
                chunk = await reader.read(65536)
                if not chunk:
                    raise ConnectionError("the proxy closed the connection")
                buf += chunk
            status, length = end
            del buf[:length]
            run.latencies.append(time.perf_counter() - start)
            run.statuses[status] = run.statuses.get(status, 0) + 1
    finally:
        writer.close()


async def drive(
    port: int,
    targets: Callable[[], Target | None],
    *,
    seconds: float | None = None,
    connections: int = 32,
    rate: float | None = None,
) -> Run:
    """Closed loop (``rate`` None: each connection sends its next request on an answer) or
    paced (``rate`` requests a second, latency from each one's due time), until ``seconds``
    passed or ``targets`` returns None."""
    run = Run()
    deadline = None if seconds is None else time.perf_counter() + seconds

    def next_target() -> Target | None:
        if deadline is not None and time.perf_counter() >= deadline:
            return None
        return targets()

    due: asyncio.Queue[float] | None = None
    pacer: asyncio.Task[None] | None = None
    if rate is not None:
        due = asyncio.Queue()

        async def pace() -> None:
            assert due is not None
            t0, i = time.perf_counter(), 0
            while True:
                now = time.perf_counter()
                while t0 + i / rate <= now:
                    due.put_nowait(t0 + i / rate)
                    i += 1
                await asyncio.sleep(0.0005)

        pacer = asyncio.create_task(pace())
    started = time.perf_counter()
    tasks = [
        asyncio.create_task(_connection(port, next_target, run, due)) for _ in range(connections)
    ]
    try:
        await asyncio.gather(*tasks)
    finally:
        if pacer is not None:
            pacer.cancel()
    run.seconds = time.perf_counter() - started
    return run


def cycle(targets: Sequence[Target]) -> Callable[[], Target]:
    position = 0

    def take() -> Target:
        nonlocal position
        position = (position + 1) % len(targets)
        return targets[position]

    return take


def once(targets: Sequence[Target]) -> Callable[[], Target | None]:
    it = iter(targets)
    return lambda: next(it, None)


# -- the proxy's figures -------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 2**20


def metric(admin: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else float("nan")


def gc_pause_buckets(admin: int) -> dict[float, float]:
    """edge_gc_pause_seconds, every generation: upper bound (s) -> collections at most that long."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    counts: dict[float, float] = {}
    for le, n in re.findall(
        r'^edge_gc_pause_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\} (\S+)$', text, re.M
    ):
        bound = float("inf") if le == "+Inf" else float(le)
        counts[bound] = counts.get(bound, 0.0) + float(n)
    return counts


def longest_between(before: dict[float, float], after: dict[float, float]) -> float:
    """The bucket bound (s) of the longest collection made between two readings: the
    histogram's resolution, an upper bound."""
    grown = [b for b in sorted(after) if after[b] - before.get(b, 0.0) > 0]
    # Cumulative buckets: the longest pause is in the first bucket that holds all new ones.
    total = max((after[b] - before.get(b, 0.0) for b in after), default=0.0)
    for bound in grown:
        if after[bound] - before.get(bound, 0.0) >= total:
            return bound
    return 0.0


async def pg_counters(dsn: str) -> dict[str, float]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        calls = await conn.fetchval(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d"
            " ON d.oid = s.dbid WHERE d.datname = current_database()"
            " AND s.query NOT LIKE '%pg_stat%'"
        )
        rows = {
            r["relname"]: r
            for r in await conn.fetch(
                "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                " WHERE schemaname = 'identity'"
            )
        }
        # Key usage rows, counted by the statement that writes them (pg_stat_statements is
        # current at once; pg_stat_user_tables lags by up to 10 s for an idle connection).
        usage_rows = await conn.fetchval(
            "SELECT coalesce(sum(rows), 0) FROM pg_stat_statements s JOIN pg_database d"
            " ON d.oid = s.dbid WHERE d.datname = current_database()"
            " AND s.query LIKE '%UPDATE identity.tenant_api_keys k%'"
        )
        xacts = await conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database"
            " WHERE datname = current_database()"
        )
    finally:
        await conn.close()

    def count(name: str, column: str) -> float:
        r = rows.get(name)
        return 0.0 if r is None else float(r[column])

    keys, daily = "tenant_api_keys", "tenant_usage_daily"
    return {
        "queries": float(calls),
        "xacts": float(xacts),
        "key_writes": float(usage_rows),
        "daily_writes": count(daily, "n_tup_ins") + count(daily, "n_tup_upd"),
        "log_rows": sum(
            count(n, "n_tup_ins") for n in rows if n.startswith("tenant_api_request_logs_")
        ),
        "upd": count(keys, "n_tup_upd") + count(daily, "n_tup_upd"),
        "hot": count(keys, "n_tup_hot_upd") + count(daily, "n_tup_hot_upd"),
    }


@dataclass
class Proxy:
    proc: subprocess.Popen[bytes]
    port: int
    admin: int


def start_proxy(config: Path, env: dict[str, str], log: Path) -> Proxy:
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(
        [
            *("taskset", "-c", PROXY_CORE, sys.executable, "-m", "proxy", "serve"),
            *("--config", str(config), "--listen", f"127.0.0.1:{port}"),
            *("--admin-listen", f"127.0.0.1:{admin}"),
        ],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_port(port, proc, 600)
    wait_ready(admin, 600)
    return Proxy(proc, port, admin)


def start_upstream() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            *("taskset", "-c", LOAD_CORE, sys.executable, "loadtests/fast_upstream.py"),
            *("--port", str(port)),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port, proc)
    return proc, port


def machine_load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


# -- the run -------------------------------------------------------------------------------------


async def scenario(args: argparse.Namespace, dsn: str, env: dict[str, str], tmp: Path) -> str:
    salt, per = args.salt, args.keys_per_tenant
    rng = random.Random(7)
    warm = [(f"{slug_for(t)}.{DOMAIN}", key_for(salt, t * per)) for t in range(args.warm_tenants)]
    cold_order = list(range(args.tenants))
    rng.shuffle(cold_order)
    cold = [(f"{slug_for(t)}.{DOMAIN}", key_for(salt, t * per + 1)) for t in cold_order]
    config = tmp / "edge.toml"
    upstream, up = start_upstream()
    procs: list[subprocess.Popen[bytes]] = [upstream]
    try:
        body = (
            f'[audit]\nspool_dir = "{tmp / "spool"}"\n'
            f'[upstreams.fast]\nurls = ["http://127.0.0.1:{up}"]\n'
            '[[routes]]\nprefix = "/v1/renders"\nupstream = "fast"\nauth = "api_key"\n'
            'audit = true\nscopes = { GET = "renders:read" }\n'
        )
        config.write_text(f'[tenancy]\nplatform_domains = ["{DOMAIN}"]\n' + body)
        bare = tmp / "bare.toml"  # nothing cached, nothing preloaded: the RSS baseline
        bare.write_text(
            f'[tenancy]\nplatform_domains = ["{DOMAIN}"]\npreload_max_entries = 0\n' + body
        )
        c = start_proxy(bare, env, tmp / "proxy-bare.log")
        rss_base = rss_mb(c.proc.pid)
        stop(c.proc)
        t0 = time.monotonic()
        a = start_proxy(config, env, tmp / "proxy-a.log")
        gc_at_ready = gc_pause_buckets(a.admin)  # the preload's own pauses came before ready
        procs.append(a.proc)
        print(f"  proxy A ready in {time.monotonic() - t0:.1f} s", flush=True)
        await drive(a.port, once(warm), connections=16)  # the warm set's first misses
        w = await drive(a.port, cycle(warm), seconds=args.seconds)
        print(f"  warm (A, fresh): {w.rps:,.0f} req/s, p99 {w.p99_ms():.1f} ms {w.statuses}")
        c = await drive(a.port, once(cold))
        rss_after = rss_mb(a.proc.pid)
        print(
            f"  cold (A, {len(cold):,} tenants once): {c.rps:,.0f} req/s,"
            f" p99 {c.p99_ms():.1f} ms {c.statuses}"
        )
        # Tenants and prefixes with their keys, all cached now (and with a preload, every
        # other name held too: its memory is in the growth, not in the count).
        entries = args.tenants + len(cold) + args.warm_tenants
        rss_per_entry = (rss_after - rss_base) * 2**20 / entries
        print(
            f"  RSS: {rss_base:.0f} MB with nothing cached, A {rss_after:.0f} MB after the cold"
            f" pass: {rss_per_entry:.0f} B per cached tenant or prefix ({entries:,})"
        )
        # The cold pass's key usage is written within one usage flush interval: past it, the
        # Postgres figures below are those of warm traffic alone.
        await drive(a.port, cycle(warm), seconds=11, connections=8)

        t0 = time.monotonic()
        b = start_proxy(config, env, tmp / "proxy-b.log")
        procs.append(b.proc)
        print(f"  proxy B ready in {time.monotonic() - t0:.1f} s", flush=True)
        await drive(b.port, once(warm), connections=16)
        rate = args.rate_share * w.rps
        full, fresh, pg = [], [], []
        for _ in range(args.rounds):
            before = await pg_counters(dsn)
            r = await drive(a.port, cycle(warm), seconds=args.seconds, rate=rate)
            after = await pg_counters(dsn)
            pg.append({k: (after[k] - before[k]) / r.seconds for k in after})
            full.append(r)
            fresh.append(await drive(b.port, cycle(warm), seconds=args.seconds, rate=rate))
        p99_full = statistics.median(r.p99_ms() for r in full)
        p99_fresh = statistics.median(r.p99_ms() for r in fresh)
        print(
            f"  paced warm at {rate:,.0f} req/s: p99 full cache (A) {p99_full:.1f} ms,"
            f" fresh (B) {p99_fresh:.1f} ms; statuses A {full[-1].statuses} B {fresh[-1].statuses}"
        )
        key_writes = statistics.median(p["key_writes"] for p in pg)
        daily_writes = statistics.median(p["daily_writes"] for p in pg)
        writes = key_writes + daily_writes
        bound = writes_bound(args.warm_tenants, args.warm_tenants)
        upd = sum(p["upd"] for p in pg)
        hot = sum(p["hot"] for p in pg) / upd if upd else float("nan")
        queries = statistics.median(p["queries"] for p in pg)
        xacts = statistics.median(p["xacts"] for p in pg)
        print(
            "  Postgres during A's paced warm traffic:"
            f" {queries:,.0f} queries/s, {xacts:,.0f} transactions/s,"
            f" {writes:,.0f} row writes/s to keys and daily usage"
            f" ({key_writes:,.0f} + {daily_writes:,.0f};"
            f" bound {bound:,.0f}), HOT share of their updates {hot:.0%},"
            f" {statistics.median(p['log_rows'] for p in pg):,.0f} audit rows/s"
        )

        rss0 = rss_mb(a.proc.pid)
        prefixes = [key_for(salt, i)[:12] for i in rng.sample(range(args.tenants * per), 5000)]
        letters = "abcdefghijklmnopqrstuvwxyz0123456789"

        def flood() -> Target:
            kind = rng.randrange(3)
            junk = "".join(rng.choices(letters, k=12))
            if kind == 0:  # a real prefix, a wrong secret
                host = warm[rng.randrange(len(warm))][0]
                return host, rng.choice(prefixes) + secrets.token_hex(14)
            if kind == 1:  # an unknown prefix
                return warm[rng.randrange(len(warm))][0], "fr_live_" + junk + junk + junk
            if rng.randrange(2):
                return f"{junk}.{DOMAIN}", key_for(salt, 0)  # an unknown slug
            return f"{junk}.example.net", key_for(salt, 0)  # an unknown host

        fl = await drive(a.port, flood, seconds=args.flood_seconds)
        rss1 = rss_mb(a.proc.pid)
        print(
            f"  flood {args.flood_seconds:.0f} s: {fl.rps:,.0f} req/s {fl.statuses};"
            f" RSS A {rss0:.0f} -> {rss1:.0f} MB"
        )
        gc_startup_ms = metric(a.admin, "edge_gc_pause_max_seconds") * 1000
        # Bounded twice: by the bucket of the longest pause since ready, and by the longest
        # pause since the start (edge_gc_pause_max_seconds).
        bucket_ms = longest_between(gc_at_ready, gc_pause_buckets(a.admin)) * 1000
        gc_max_ms = min(bucket_ms, gc_startup_ms)
        print(
            f"  longest GC pause of A while serving: at most {gc_max_ms:.1f} ms (its bucket"
            f" {bucket_ms:g} ms; the longest since its start, preload included,"
            f" {gc_startup_ms:.1f} ms)"
        )
        print(f"  machine: {machine_load()}")
        return scale_line(
            cold_warm=c.rps / w.rps,
            warm_p99_ratio=p99_full / p99_fresh,
            gc_pause_max_ms=gc_max_ms,
            rss_per_entry_b=rss_per_entry,
            pg_writes_per_s=writes,
            flood_rss_growth_mb=rss1 - rss0,
        )
    finally:
        for p in reversed(procs):
            stop(p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=100_000)
    parser.add_argument("--keys-per-tenant", type=int, default=10)
    parser.add_argument("--warm-tenants", type=int, default=1_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate-share", type=float, default=0.25)
    parser.add_argument("--flood-seconds", type=float, default=30.0)
    parser.add_argument("--salt", default=secrets.token_hex(8))
    args = parser.parse_args()
    if not 0 < args.warm_tenants <= args.tenants:
        parser.error("--warm-tenants must be between 1 and --tenants")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit(
            "bench-scale: needs two cores (the proxy on one, the load and servers on the other)"
        )
    print(
        f"flatrender-edge bench-scale: {args.tenants:,} tenants,"
        f" {args.tenants * args.keys_per_tenant:,} keys; {machine_load()}"
    )
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # Postgres, Redis and the load inherit core 1
    pg, rd = PostgresServer(), RedisServer()
    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-scale-"))
    try:
        pg.start()
        rd.start()
        dsn = pg.create_database("scale")
        took = asyncio.run(seed(dsn, args.tenants, args.keys_per_tenant, args.salt))
        print(f"  seeded in {took:.0f} s", flush=True)
        env = {**os.environ, "DATABASE_URL": dsn, "REDIS_URL": rd.url}
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        print(asyncio.run(scenario(args, dsn, env, tmp)))
    finally:
        rd.cleanup()
        pg.cleanup()


if __name__ == "__main__":
    main()
