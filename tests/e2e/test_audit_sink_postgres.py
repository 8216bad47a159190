"""The database-mode audit sink against real Postgres (CONTRACT §9, issue 6): exactly once,
partitions on demand, metering from inserted rows only, the spool and its cap, shared spools."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest
import pytest_asyncio

from proxy.audit.postgres import PostgresAuditSink
from proxy.audit.record import AuditRecord
from proxy.audit.spool import Spool
from proxy.settings import AuditSettings
from tests.e2e.auditing import (
    DEFAULT_TENANT,
    assert_usage_matches_rows,
    copies,
    count_rows,
    record,
    settings,
)
from tests.e2e.support import within
from tests.procs import free_port
from tests.servers import PostgresServer
from tests.unit.test_audit_spool import dead_pid


@pytest_asyncio.fixture
async def db(migrated_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(migrated_dsn)
    yield conn
    await conn.close()


async def write_all(
    dsn: str, config: AuditSettings, rows: list[AuditRecord], spool: Spool | None = None
) -> PostgresAuditSink:
    """One sink's whole life: start, submit, close (which drains)."""
    sink = PostgresAuditSink(dsn, config, spool=spool)
    await sink.start()
    for r in rows:
        sink.submit(r)
    await sink.close()
    return sink


async def test_a_full_batch_goes_at_once_and_a_partial_one_on_the_interval(
    migrated_dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    full = PostgresAuditSink(
        migrated_dsn, settings(tmp_path / "a", batch_max_rows=10, flush_interval_ms=3_600_000)
    )
    await full.start()
    try:
        for i in range(10):
            full.submit(record(i))
        await within(2.0, lambda: _is(count_rows(db), 10))
    finally:
        await full.close()
    timed = PostgresAuditSink(migrated_dsn, settings(tmp_path / "b", flush_interval_ms=50))
    await timed.start()
    try:
        for i in range(3):
            timed.submit(record(100 + i))
        await within(2.0, lambda: _is(count_rows(db), 13))
        assert timed.queue_depth == 0 and timed.counters.batches == 1
    finally:
        await timed.close()


async def test_steady_traffic_is_written_once_per_interval_not_row_by_row(
    migrated_dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Rows that keep arriving while a batch is written wait for the next interval: a round
    that drained "until empty" never ended under steady traffic and committed a transaction
    for every few rows."""
    config = settings(
        tmp_path, flush_interval_ms=200, batch_max_rows=10_000, buffer_max_rows=20_000
    )
    sink = PostgresAuditSink(migrated_dsn, config)
    await sink.start()
    n = 0
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.0
        while loop.time() < end:  # about a row a millisecond, never a full batch
            sink.submit(record(5000 + n))
            n += 1
            await asyncio.sleep(0.001)
        # 1 s at a 200 ms interval: about 5 rounds, each one batch (the first comes at once).
        assert sink.counters.batches <= 8, (sink.counters.batches, n)
        await within(5.0, lambda: _is(count_rows(db), n))
    finally:
        await sink.close()
    assert sink.counters.rows_written == n


async def test_a_batch_is_encoded_in_slices_that_let_requests_run_between_them(
    migrated_dsn: str, db: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg encodes a COPY from a plain iterable in one go: 650 rows held the event loop for
    about 3 ms, and every request arriving meanwhile waited. Between slices the loop runs
    other tasks (here a ticker standing for them)."""
    import proxy.audit.postgres as audit_postgres

    turns = 0
    seen: list[int] = []  # the ticker's count when each row was encoded
    encode = audit_postgres._copy_row

    def observed(r: AuditRecord) -> tuple[object, ...]:
        seen.append(turns)
        return encode(r)

    monkeypatch.setattr(audit_postgres, "_copy_row", observed)
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal turns
        while not done.is_set():
            turns += 1
            await asyncio.sleep(0)

    rows = [record(7000 + i) for i in range(650)]
    task = asyncio.create_task(ticker())
    try:
        await write_all(migrated_dsn, settings(tmp_path, batch_max_rows=1000), rows)
    finally:
        done.set()
        await task
    assert await count_rows(db) >= 650 and len(seen) == 650
    # The loop got a turn at least every 100 rows (in one go, the ticker's count never moves).
    assert len(set(seen)) >= 650 // 100, sorted(set(seen))


async def _is(value: object, want: object) -> bool:
    return await value == want  # type: ignore[misc]


async def test_the_same_batch_written_twice_leaves_one_copy(
    migrated_dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    statuses = [200] * 5 + [404, 401, 499] + [502, 503]
    rows = [record(i, status_code=s) for i, s in enumerate(statuses)]
    first = await write_all(migrated_dsn, settings(tmp_path / "spool"), rows)
    again = await write_all(migrated_dsn, settings(tmp_path / "spool"), rows)
    assert (first.counters.rows_written, first.counters.rows_duplicate) == (10, 0)
    assert (again.counters.rows_written, again.counters.rows_duplicate) == (10, 10)
    assert set((await copies(db, [r.request_id for r in rows])).values()) == {1}
    usage = await db.fetchrow(
        "SELECT api_calls, api_4xx, api_5xx FROM identity.tenant_usage_daily WHERE tenant_id = $1",
        uuid.UUID(DEFAULT_TENANT),
    )
    assert tuple(usage) == (10, 3, 2)  # 499 (client went away) is a 4xx
    await assert_usage_matches_rows(db)


async def test_rows_land_in_months_that_have_no_partition(
    migrated_dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    at = {
        "seed": datetime(2026, 1, 31, 23, 59, 59, 999_999, tzinfo=UTC),  # y2026m01, the seed's
        "boundary": datetime(2026, 2, 1, tzinfo=UTC),  # the first instant of February
        "future": datetime(2027, 3, 15, 8, 30, tzinfo=UTC),
        "now": datetime.now(UTC),
    }
    rows = {name: record(i, created_at=t) for i, (name, t) in enumerate(at.items())}
    await write_all(migrated_dsn, settings(tmp_path / "spool"), list(rows.values()))
    placed = {
        r["id"]: r["part"]
        for r in await db.fetch(
            "SELECT request_id::text AS id, tableoid::regclass::text AS part"
            " FROM identity.tenant_api_request_logs"
        )
    }
    now = at["now"]
    assert {name: placed[r.request_id] for name, r in rows.items()} == {
        "seed": "identity.tenant_api_request_logs_y2026m01",
        "boundary": "identity.tenant_api_request_logs_y2026m02",
        "future": "identity.tenant_api_request_logs_y2027m03",
        "now": f"identity.tenant_api_request_logs_y{now.year}m{now.month:02d}",
    }
    days = {
        r["usage_date"]
        for r in await db.fetch("SELECT usage_date FROM identity.tenant_usage_daily")
    }
    assert days == {t.date() for t in at.values()}  # UTC days
    await assert_usage_matches_rows(db)


async def test_two_processes_reaching_a_new_month_together(
    migrated_dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    july = datetime(2028, 7, 1, tzinfo=UTC)
    batches = [[record(i + 1000 * k, created_at=july) for i in range(50)] for k in range(4)]
    await asyncio.gather(
        *(
            write_all(migrated_dsn, settings(tmp_path / f"s{k}"), rows)
            for k, rows in enumerate(batches)
        )
    )
    assert await count_rows(db) == 200
    parts = await db.fetchval(
        "SELECT count(*) FROM pg_inherits WHERE inhrelid = "
        "'identity.tenant_api_request_logs_y2028m07'::regclass"
    )
    assert parts == 1


async def test_a_hard_deleted_tenant_does_not_fail_the_batch(
    migrated_dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    ghost = str(uuid.uuid4())  # no such tenant (deleted after its requests were served)
    rows = [record(i) for i in range(5)] + [record(10 + i, tenant_id=ghost) for i in range(3)]
    sink = await write_all(migrated_dsn, settings(tmp_path / "spool"), rows)
    assert sink.counters.rows_dropped == 0 and await count_rows(db) == 8  # the audit trail stays
    metered = await db.fetch("SELECT tenant_id::text AS t FROM identity.tenant_usage_daily")
    assert [r["t"] for r in metered] == [DEFAULT_TENANT]
    await assert_usage_matches_rows(db)


async def test_a_row_postgres_rejects_is_isolated_dropped_and_counted(
    migrated_dsn: str, db: asyncpg.Connection, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await db.execute(
        """CREATE FUNCTION public.poison() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               IF NEW.path = '/poison' THEN
                   RAISE EXCEPTION 'poisoned row' USING ERRCODE = '22023';
               END IF;
               RETURN NEW;
           END $$;
           CREATE TRIGGER poison BEFORE INSERT ON identity.tenant_api_request_logs
               FOR EACH ROW EXECUTE FUNCTION public.poison();"""
    )
    rows = [record(i) for i in range(64)]
    rows[37] = record(37, path="/poison")
    malformed = record(99, request_id="not-a-uuid")  # only a hand-edited spool could hold it
    sink = await write_all(migrated_dsn, settings(tmp_path / "spool"), [*rows, malformed])
    assert await count_rows(db) == 63
    assert sink.counters.rows_dropped == 2 and sink.counters.rows_written == 63
    assert caplog.text.count("AUDIT ROWS DROPPED") == 2
    await assert_usage_matches_rows(db)


async def test_text_postgres_cannot_hold_is_cleaned_not_lost(
    migrated_dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    odd = record(1, path="/v1/r\udcff\x00x", user_agent="ua\x00", ip_address="fe80::1%eth0")
    bad_ip = record(2, ip_address="not-an-ip")
    sink = await write_all(migrated_dsn, settings(tmp_path / "spool"), [odd, bad_ip])
    assert (sink.counters.rows_written, sink.counters.rows_dropped) == (2, 0)
    got = {
        r["id"]: r
        for r in await db.fetch(
            "SELECT request_id::text AS id, path, user_agent, ip_address::text AS ip"
            " FROM identity.tenant_api_request_logs"
        )
    }
    assert got[odd.request_id]["path"] == "/v1/r?\ufffdx"
    assert got[odd.request_id]["user_agent"] == "ua\ufffd"
    assert got[odd.request_id]["ip"] == "fe80::1/128"
    assert got[bad_ip.request_id]["ip"] is None


async def test_spool_cap_drops_and_counts_and_the_next_process_replays_the_rest(
    migrated_dsn: str, db: asyncpg.Connection, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool_dir = tmp_path / "spool"
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"  # connection refused
    capped = settings(spool_dir, batch_max_rows=10, buffer_max_rows=10, spool_max_bytes=10_000)
    rows = [record(i) for i in range(100)]
    down = await write_all(nowhere, capped, rows)
    c = down.counters
    assert c.rows_written == 0 and c.rows_spooled + c.rows_dropped == 100
    assert c.rows_dropped > 0 and c.rows_spooled > 0 and c.rows_spooled % 10 == 0
    files = sorted(spool_dir.glob("*.jsonl"))
    assert len(files) == c.rows_spooled // 10  # one file per batch
    assert sum(f.stat().st_size for f in files) <= 10_000
    assert "AUDIT ROWS DROPPED" in caplog.text
    spooled = [
        AuditRecord.from_json_row(orjson.loads(line))
        for f in files
        for line in f.read_bytes().splitlines()
    ]

    up = PostgresAuditSink(migrated_dsn, capped)
    await up.start()
    try:
        await within(5.0, lambda: _is(count_rows(db), c.rows_spooled))
        await within(2.0, lambda: _no_files(spool_dir))
    finally:
        await up.close()
    assert up.counters.rows_replayed == c.rows_spooled
    assert set((await copies(db, [r.request_id for r in spooled])).values()) == {1}
    await assert_usage_matches_rows(db)


async def _no_files(directory: Path) -> bool:
    return not await asyncio.to_thread(os.listdir, directory)


async def test_processes_sharing_a_spool_replay_each_file_once(
    migrated_dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    left = Spool(spool_dir, 1 << 30)
    left.prepare()
    rows = [record(i) for i in range(500)]
    for k in range(0, 500, 25):
        assert left.write(rows[k : k + 25])
    # Two live processes (pids of this one and its parent) start on the same directory at once.
    sinks = [
        PostgresAuditSink(
            migrated_dsn, settings(spool_dir), spool=Spool(spool_dir, 1 << 30, pid=pid)
        )
        for pid in (os.getpid(), os.getppid())
    ]
    await asyncio.gather(*(s.start() for s in sinks))
    try:
        await within(10.0, lambda: _is(count_rows(db), 500))
    finally:
        await asyncio.gather(*(s.close() for s in sinks))
    assert sum(s.counters.rows_replayed for s in sinks) == 500
    assert sum(s.counters.rows_duplicate for s in sinks) == 0  # no file was replayed twice
    assert not any(spool_dir.iterdir())
    await assert_usage_matches_rows(db)


async def test_a_replay_cut_short_by_a_crash_lands_once(
    migrated_dsn: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A process committed a spool file's rows and was killed before deleting the file: the
    claim it left is taken back by the next process, whose replay inserts nothing twice."""
    spool_dir = tmp_path / "spool"
    committed = [record(i) for i in range(30)]
    await write_all(migrated_dsn, settings(spool_dir), committed)
    fresh = [record(100 + i) for i in range(20)]
    killed = Spool(spool_dir, 1 << 30, pid=dead_pid())
    assert killed.write(committed + fresh)
    assert killed.claim_next() is not None  # ...and then it died holding the claim

    sink = PostgresAuditSink(migrated_dsn, settings(spool_dir))
    await sink.start()
    try:
        await within(5.0, lambda: _is(count_rows(db), 50))
    finally:
        await sink.close()
    assert sink.counters.rows_replayed == 50 and sink.counters.rows_duplicate == 30
    assert set((await copies(db, [r.request_id for r in committed + fresh])).values()) == {1}
    await assert_usage_matches_rows(db)


async def test_shutdown_against_a_black_holed_postgres_is_bounded_and_spools(
    migrated_dsn: str, db: asyncpg.Connection, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    spool_dir = tmp_path / "spool"
    config = settings(
        spool_dir, flush_interval_ms=3_600_000, write_timeout_s=0.5, drain_timeout_s=0.5
    )
    sink = PostgresAuditSink(migrated_dsn, config)
    await sink.start()
    rows = [record(i) for i in range(5)]
    postgres_server.pause()  # accepts connections, never answers
    try:
        for r in rows:
            sink.submit(r)
        started = time.monotonic()
        await sink.close()
        assert time.monotonic() - started < 2.0
    finally:
        postgres_server.resume()
    assert sink.counters.rows_spooled == 5 and len(list(spool_dir.glob("*.jsonl"))) == 1
    sink = PostgresAuditSink(migrated_dsn, settings(spool_dir))  # the next process
    await sink.start()
    try:
        await within(5.0, lambda: _is(count_rows(db), 5))
    finally:
        await sink.close()
    assert set((await copies(db, [r.request_id for r in rows])).values()) == {1}
