"""Benchmark of the database-mode audit write path (issue 6): is audit a bottleneck?

Pushes N rows through ``PostgresAuditSink`` exactly as the proxy does (``submit`` on the event
loop, the flusher's batches: COPY into staging, INSERT ... ON CONFLICT ... RETURNING, usage
upsert) and prints:

* ``submit()``: what the request path pays per row;
* write path: rows/s from the first submit to the last commit, and the CPU this process spent
  per row (the flusher shares the proxy's core: this is what audit takes from serving);
* replay: the same rows written again, all of them duplicates (a spool replayed after a lost
  acknowledgement);
* spool: rows/s into ``spool_dir`` (one fsync'd file per batch), the outage path.

    .venv/bin/python loadtests/bench_audit.py [--rows 200000] [--batch 1000] [--dsn DSN]

Without ``--dsn`` it starts a throwaway Postgres (tests/servers.py: fsync=off and
synchronous_commit=off, so commits cost less than on a durable server; with a batch of 1000 rows
that is one WAL flush per 1000 rows either way). With ``--dsn`` the database must be migrated
and the rows stay there (they are in the default tenant, clearly marked by their user agent).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.audit.postgres import PostgresAuditSink  # noqa: E402
from proxy.audit.record import AuditRecord  # noqa: E402
from proxy.audit.spool import Spool  # noqa: E402
from proxy.migrate import apply_migrations  # noqa: E402
from proxy.settings import AuditSettings  # noqa: E402

DEFAULT_TENANT = "00000000-0000-0000-0000-000000000001"


def make_rows(n: int) -> list[AuditRecord]:
    """Rows shaped like real traffic: keyed, a mix of statuses, realistic path and agent."""
    start = datetime.now(UTC)
    key = str(uuid.uuid4())
    statuses = (200,) * 17 + (401, 429, 502)
    return [
        AuditRecord(
            created_at=start + timedelta(microseconds=i),
            tenant_id=DEFAULT_TENANT,
            api_key_id=key,
            method="GET",
            path=f"/v1/renders/{i % 5000}",
            status_code=statuses[i % len(statuses)],
            duration_ms=12,
            request_id=str(uuid.uuid4()),
            ip_address=f"203.0.113.{i % 250}",
            user_agent="bench_audit/1.0 (flatrender-edge)",
            error_message=None,
        )
        for i in range(n)
    ]


async def push(
    dsn: str, rows: list[AuditRecord], batch: int, spool_dir: Path
) -> tuple[float, float, PostgresAuditSink]:
    """Submit every row as fast as the loop allows; (wall s, CPU s) until the last commit."""
    settings = AuditSettings(
        flush_interval_ms=100,
        spool_dir=spool_dir,
        batch_max_rows=batch,
        buffer_max_rows=len(rows),  # measure Postgres, not the spool
        write_timeout_s=30,
        drain_timeout_s=600,
    )
    sink = PostgresAuditSink(dsn, settings)
    await sink.start()
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(rows), batch):
        for r in rows[i : i + batch]:
            sink.submit(r)
        await asyncio.sleep(0)  # the proxy yields between requests; so does this producer
    await sink.close()  # writes what is left (drain_timeout_s is generous here)
    return time.perf_counter() - wall, time.process_time() - cpu, sink


def submit_cost(rows: list[AuditRecord]) -> float:
    """Microseconds per ``submit`` on the request path (no flusher running)."""
    sink = PostgresAuditSink("postgresql://unused/x", AuditSettings(buffer_max_rows=len(rows) + 1))
    started = time.perf_counter()
    for r in rows:
        sink.submit(r)
    return (time.perf_counter() - started) / len(rows) * 1e6


def spool_rate(rows: list[AuditRecord], batch: int, directory: Path) -> float:
    spool = Spool(directory, 1 << 40)
    spool.prepare()
    started = time.perf_counter()
    for i in range(0, len(rows), batch):
        spool.write(rows[i : i + batch])
    return len(rows) / (time.perf_counter() - started)


async def run(dsn: str, n: int, batch: int) -> None:
    rows = make_rows(n)
    print(f"rows: {n}, batch_max_rows: {batch}")
    print(f"submit() on the request path: {submit_cost(rows):.2f} µs per row")
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu, sink = await push(dsn, rows, batch, Path(tmp) / "spool")
        c = sink.counters
        assert c.rows_written == n and c.rows_duplicate == 0 and c.rows_dropped == 0, c
        cpu_us = cpu / n * 1e6
        print(
            f"write path: {n / wall:,.0f} rows/s ({c.batches} batches, "
            f"{wall / c.batches * 1000:.1f} ms per batch); "
            f"CPU in this process {cpu_us:.1f} µs per row"
        )
        wall, cpu, sink = await push(dsn, rows, batch, Path(tmp) / "spool")
        assert sink.counters.rows_duplicate == n
        print(
            f"replay of the same rows (all duplicates): {n / wall:,.0f} rows/s; "
            f"CPU {cpu / n * 1e6:.1f} µs per row"
        )
        rate = await asyncio.to_thread(spool_rate, rows, batch, Path(tmp) / "disk")
        print(f"spool (one fsync'd file per batch): {rate:,.0f} rows/s")
    print(
        f"=> CPU-bound, one core would feed {1e6 / cpu_us:,.0f} audited requests/s to this write "
        f"path; at 3,000 audited requests/s a proxy core spends {3000 * cpu_us / 1e4:.1f}% of "
        "itself on audit"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--dsn", help="a migrated database (default: a throwaway Postgres)")
    args = parser.parse_args()
    if args.dsn:
        uvloop.run(run(args.dsn, args.rows, args.batch))
        return
    from tests.servers import PostgresServer

    with PostgresServer() as server:
        dsn = server.create_database("bench_audit")
        asyncio.run(apply_migrations(dsn))
        uvloop.run(run(dsn, args.rows, args.batch))


if __name__ == "__main__":
    main()
