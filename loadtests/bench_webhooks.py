"""Benchmark of webhooks (CONTRACT §11), in one run:

* delivery: ``--events`` events (one delivery each, to a fast local receiver:
  loadtests/fast_upstream.py) published in one transaction, then one ``python -m proxy webhooks
  run`` process delivers them; printed: deliveries per second (wall clock, from the commit to the
  last success recorded) and per second of the dispatcher's CPU (its user + system time over
  the same span: what one core would do);
* publish cost: ``--publish`` events published with ``identity.publish_event`` inside a caller's
  transaction (each of them fanned out to two webhooks and metered), against a plain ``INSERT``
  of the same event row into a table of the same shape in the same kind of transaction; rounds
  of both alternate so that both see the same machine. Printed: µs per event each, and their
  ratio.

    .venv/bin/python loadtests/bench_webhooks.py [--events 5000] [--publish 2000] [--dsn DSN]

Without ``--dsn`` it starts a throwaway Postgres (tests/servers.py: fsync=off, so commits cost
less than on a durable server). With ``--dsn`` the database must be migrated; the bench adds a
tenant and webhooks of its own (tests/e2e/webhooks.py helpers) and leaves them there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.migrate import apply_migrations  # noqa: E402
from tests.e2e.webhooks import add_webhook, new_tenant  # noqa: E402
from tests.procs import free_port, stop, wait_port, write_config  # noqa: E402

PUBLISH = "SELECT identity.publish_event($1::uuid, $2::uuid, $3, $4::jsonb, $5)"
PLAIN = """INSERT INTO bench_plain_events (id, tenant_id, type, data, occurred_at)
           VALUES ($1::uuid, $2::uuid, $3, $4::jsonb, $5)"""
DATA = '{"render_id": "r-1", "render_seconds": 42.5, "compute_seconds": 310}'


async def delivery(dsn: str, events: int, receiver_port: int, tmp: Path) -> tuple[float, float]:
    """(deliveries per wall second, deliveries per dispatcher CPU second)."""
    conn = await asyncpg.connect(dsn)
    try:
        tenant = await new_tenant(conn)
        await add_webhook(conn, tenant, f"http://127.0.0.1:{receiver_port}/hook", ["*"])
        async with conn.transaction():
            now = datetime.now(UTC)
            rows = [(str(uuid.uuid4()), tenant, "render.started", "{}", now) for _ in range(events)]
            await conn.executemany(PUBLISH, rows)
        config = write_config(
            tmp / "edge.toml",
            upstreams={"render-api": {"urls": ["http://127.0.0.1:9"]}},
            routes=[],
            sections={
                "webhooks": {
                    "allow_http": True,
                    "allow_networks": ["127.0.0.0/8"],
                    # One receiver takes everything: per-webhook cap as wide as the process's.
                    "max_in_flight_per_webhook": 256,
                },
                "telemetry": {"access_log": False},
            },
        )
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "proxy", "webhooks", "run", "--config", str(config)),
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": dsn},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            watched = psutil.Process(proc.pid)
            cpu0 = sum(watched.cpu_times()[:2])
            start = time.monotonic()
            while True:
                done = await conn.fetchval(
                    "SELECT count(*) FROM identity.tenant_webhook_deliveries"
                    " WHERE tenant_id = $1 AND succeeded",
                    tenant,
                )
                if done >= events:
                    break
                if time.monotonic() - start > 300:
                    raise SystemExit(f"only {done} of {events} delivered in 300 s")
                await asyncio.sleep(0.05)
            wall = time.monotonic() - start
            cpu = sum(watched.cpu_times()[:2]) - cpu0
        finally:
            proc.terminate()
            await proc.wait()
        return events / wall, events / cpu
    finally:
        await conn.close()


async def publish_cost(dsn: str, n: int, rounds: int) -> tuple[float, float, float]:
    """(µs per publish_event, the same for a tenant without webhooks, µs per plain INSERT), the
    medians over alternating rounds."""
    conn = await asyncpg.connect(dsn)
    try:
        quiet = await new_tenant(conn)  # no webhook: no fan-out, no NOTIFY; metering still
        tenant = await new_tenant(conn)
        # A realistic tenant: two webhooks receive render.completed, one does not.
        await add_webhook(conn, tenant, "https://a.example/", ["render.*"])
        await add_webhook(conn, tenant, "https://b.example/", ["render.completed"])
        await add_webhook(conn, tenant, "https://c.example/", ["account.*"])
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_plain_events (LIKE identity.edge_events"
            " INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)"
        )
        published: list[float] = []
        unwatched: list[float] = []
        plain: list[float] = []
        for _ in range(rounds):
            for sql, owner, into in (
                (PUBLISH, tenant, published),
                (PUBLISH, quiet, unwatched),
                (PLAIN, tenant, plain),
            ):
                rows = [
                    (str(uuid.uuid4()), owner, "render.completed", DATA, datetime.now(UTC))
                    for _ in range(n)
                ]
                start = time.perf_counter()
                # Each event in its own caller's transaction, as a render service does it.
                for row in rows:
                    async with conn.transaction():
                        await conn.execute(sql, *row)
                into.append((time.perf_counter() - start) / n * 1e6)
        return statistics.median(published), statistics.median(unwatched), statistics.median(plain)
    finally:
        await conn.close()


async def run(dsn: str, events: int, publishes: int, rounds: int, port: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        per_wall, per_cpu = await delivery(dsn, events, port, Path(tmp))
    print(f"delivery: {events} events, one dispatcher process")
    print(f"  {per_wall:,.0f} deliveries/s (wall), {per_cpu:,.0f} per dispatcher CPU second")
    pub, unwatched, plain = await publish_cost(dsn, publishes, rounds)
    print(f"publish: {publishes} events x {rounds} rounds, each in its own transaction")
    print(f"  publish_event {pub:,.0f} µs/event (2 deliveries, metering, NOTIFY)")
    print(f"  publish_event {unwatched:,.0f} µs/event for a tenant without webhooks (metering)")
    print(f"  plain INSERT {plain:,.0f} µs/event")
    print(f"  ratio {pub / plain:.2f} (without webhooks {unwatched / plain:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--publish", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dsn", help="a migrated database (default: a throwaway Postgres)")
    args = parser.parse_args()
    port = free_port()
    receiver = subprocess.Popen(
        [sys.executable, str(ROOT / "loadtests" / "fast_upstream.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, receiver)
        if args.dsn:
            asyncio.run(run(args.dsn, args.events, args.publish, args.rounds, port))
            return
        from tests.servers import PostgresServer

        with PostgresServer() as server:
            dsn = server.create_database("bench_webhooks")
            asyncio.run(apply_migrations(dsn))
            asyncio.run(run(dsn, args.events, args.publish, args.rounds, port))
    finally:
        stop(receiver)


if __name__ == "__main__":
    main()
