"""Database-mode audit sink: every audited request lands in ``identity.tenant_api_request_logs``
exactly once, and ``identity.tenant_usage_daily`` agrees with those rows (CONTRACT §9, issue 6).

The path of a row:

1. ``submit`` appends to an in-memory buffer. It runs on the request path, so it never awaits
   and never does I/O; it only wakes the flusher when a batch is full.
2. The flusher takes up to ``batch_max_rows`` when a batch is full, or every
   ``flush_interval_ms``, and makes sure the monthly partition of each row's month exists
   (known months are remembered; ``partitions.py``).
3. One transaction per batch: COPY into a temporary staging table, ``INSERT ... ON CONFLICT
   (request_id, created_at) DO NOTHING RETURNING`` into the log, and from exactly the returned
   rows an upsert of ``api_calls`` / ``api_4xx`` / ``api_5xx`` / ``renders_started`` per tenant
   and UTC day. A batch written twice (a commit whose acknowledgement was lost, a spool file
   replayed again) inserts nothing the second time and so meters nothing: exactly once. Key
   usage (``usage_count``, ``last_used_*``) is not touched here: ``stores/usage.py`` already
   writes it for every keyed request, audited or not, and counting it twice would be the very
   error this avoids.
4. Postgres unreachable: the batch stays in the buffer and is retried with exponential backoff
   and jitter. Past ``buffer_max_rows`` (also when Postgres answers, but slower than rows
   arrive) the oldest rows spill to ``spool_dir``, one fsync'd file per batch (``spool.py``);
   past ``spool_max_bytes`` they are dropped, counted and logged as errors. Once Postgres
   answers, the buffer is written first (it is what grows), then the spool is replayed oldest
   first, each file deleted only after its rows committed. A process that starts replays
   whatever an earlier one left.
5. ``close`` (the app's cleanup, after in-flight requests finished on SIGTERM) writes what is
   queued within ``drain_timeout_s`` and spools whatever could not be written.

A row Postgres rejects as data (SQLSTATE class 22) would fail its batch forever: the batch is
split in halves until the offending row stands alone, and that row alone is dropped and counted.
A value asyncpg cannot encode (only a hand-edited spool file could hold one) sends that batch
through a row-by-row check instead. Every asyncpg/OS failure is handled here: the flusher never
dies and nothing reaches the proxy's output as a traceback.

Why not a library: the exactly-once rule lives in the database (the unique index and the
``RETURNING``-driven upsert); what is left here is a buffer, a loop and a spool directory, and no
queueing library spills to fsync'd files with atomic claims shared between processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import date
from functools import partial
from typing import Any
from uuid import UUID

import asyncpg

from proxy.audit.partitions import ensure_partition, month_of
from proxy.audit.record import AuditRecord
from proxy.audit.spool import Spool, cannot_use
from proxy.background import Job
from proxy.core.backoff import backoff_s
from proxy.settings import AuditSettings, ConfigError
from proxy.stores.postgres import DB_ERRORS, close_pool, create_pool, run_bounded

log = logging.getLogger("proxy.audit")

BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 5.0
INT4_MAX = 2**31 - 1

STAGING = "edge_audit_staging"
COLUMNS = (
    "created_at",
    "tenant_id",
    "api_key_id",
    "method",
    "path",
    "status_code",
    "duration_ms",
    "request_id",
    "ip_address",
    "user_agent",
    "error_message",
    "render_started",
)

# Once per connection, really (IF NOT EXISTS; emptied by every commit). Per transaction rather
# than a pool ``init`` hook so that a rolled-back first batch cannot leave a connection without it.
CREATE_STAGING = f"""
CREATE TEMP TABLE IF NOT EXISTS {STAGING} (
    created_at timestamptz NOT NULL,
    tenant_id uuid NOT NULL,
    api_key_id uuid,
    method text NOT NULL,
    path text NOT NULL,
    status_code int NOT NULL,
    duration_ms int NOT NULL,
    request_id uuid NOT NULL,
    ip_address inet,
    user_agent text,
    error_message text,
    render_started boolean NOT NULL
) ON COMMIT DELETE ROWS
"""

_COLS = ", ".join(COLUMNS[:-1])  # the log's columns; render_started is the staging table's
# Metering from the RETURNING of the insert: only rows that were not already there count.
# Rows go in sorted by the unique key and days are upserted sorted: two processes writing
# overlapping batches take their locks in the same order and cannot deadlock. The EXISTS guard:
# a tenant hard-deleted meanwhile has no usage row to keep (ON DELETE CASCADE removed it), and
# its foreign key must not fail the batch of every other tenant.
WRITE_BATCH = f"""
WITH inserted AS (
    INSERT INTO identity.tenant_api_request_logs ({_COLS})
    SELECT {_COLS} FROM pg_temp.{STAGING} ORDER BY request_id, created_at
    ON CONFLICT (request_id, created_at) DO NOTHING
    RETURNING tenant_id, created_at, status_code, request_id
), daily AS (
    SELECT i.tenant_id, (i.created_at AT TIME ZONE 'UTC')::date AS usage_date,
           count(*) AS calls,
           count(*) FILTER (WHERE i.status_code BETWEEN 400 AND 499) AS calls_4xx,
           count(*) FILTER (WHERE i.status_code BETWEEN 500 AND 599) AS calls_5xx,
           count(*) FILTER (WHERE EXISTS (
               SELECT 1 FROM pg_temp.{STAGING} s
                WHERE s.request_id = i.request_id AND s.created_at = i.created_at
                  AND s.render_started)) AS renders
      FROM inserted i
     GROUP BY 1, 2
), metered AS (
    INSERT INTO identity.tenant_usage_daily AS u
           (tenant_id, usage_date, api_calls, api_4xx, api_5xx, renders_started)
    SELECT d.tenant_id, d.usage_date, d.calls, d.calls_4xx, d.calls_5xx, d.renders
      FROM daily d
     WHERE EXISTS (SELECT 1 FROM identity.tenants t WHERE t.id = d.tenant_id)
     ORDER BY d.tenant_id, d.usage_date
    ON CONFLICT (tenant_id, usage_date) DO UPDATE
       SET api_calls = u.api_calls + EXCLUDED.api_calls,
           api_4xx = u.api_4xx + EXCLUDED.api_4xx,
           api_5xx = u.api_5xx + EXCLUDED.api_5xx,
           renders_started = u.renders_started + EXCLUDED.renders_started
    RETURNING 1
)
SELECT count(*) FROM inserted
"""


@dataclass(slots=True)
class AuditCounters:
    """For issue 7's /metrics. Rows written = committed (inserted, or found already there:
    ``rows_duplicate``); ``rows_replayed`` is the part of them that came from the spool."""

    rows_written: int = 0
    rows_duplicate: int = 0
    batches: int = 0
    rows_spooled: int = 0
    rows_replayed: int = 0
    rows_dropped: int = 0
    write_errors: int = 0
    last_flush_ms: float = 0.0


class _Unavailable(Exception):
    """Postgres did not commit the batch; the message says why, in one line."""


def _text(value: str) -> str:
    # Postgres text holds neither NUL nor invalid UTF-8 (aiohttp hands undecodable header and
    # path bytes over as lone surrogates); one such request must not poison its batch.
    if value.isascii() and "\x00" not in value:
        return value
    return value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


def _opt_text(value: str | None) -> str | None:
    return None if value is None else _text(value)


def _copy_row(r: AuditRecord) -> tuple[object, ...]:
    """The row as COPY sends it. UUIDs and the address go as text: asyncpg parses them once, in
    C (parsing them here too doubled the flusher's CPU per row)."""
    return (
        r.created_at,
        r.tenant_id,
        r.api_key_id,
        _text(r.method),
        _text(r.path),
        r.status_code,
        min(max(r.duration_ms, 0), INT4_MAX),
        r.request_id,
        r.ip_address,
        _opt_text(r.user_agent),
        _opt_text(r.error_message),
        r.render_started,
    )


def _checked(r: AuditRecord) -> AuditRecord:
    """The slow path, for a batch asyncpg could not encode: ``r`` made writable (an address
    that is not one is left out: the row matters more), or ``ValueError`` when it cannot be
    (the pipeline never makes such a row; a spool file edited by hand might)."""
    if r.created_at.tzinfo is None:
        raise ValueError("created_at without a UTC offset")
    if not 0 <= r.status_code <= 999:
        raise ValueError(f"status_code {r.status_code}")
    for value in (r.tenant_id, r.request_id, r.api_key_id):
        if value is not None:
            UUID(value)
    ip: str | None = None
    if r.ip_address is not None:
        with contextlib.suppress(ValueError):
            ip = str(ipaddress.ip_address(r.ip_address.partition("%")[0]))  # inet has no zone
    return replace(r, ip_address=ip)


# What asyncpg raises when it cannot encode a value for COPY, before anything reaches Postgres
# (its client-side DataError is a ValueError; asyncpg.DataError is the server's class 22).
_ENCODING_ERRORS = (ValueError, TypeError, OverflowError)


# Rows encoded between two turns of the event loop. asyncpg encodes a COPY in one go, and a
# batch of 650 rows held the loop for about 3 ms, which every request arriving meanwhile waited
# out (the p99 of the full pipeline at 1,300 req/s: 3.4 ms against 2.0 ms with no flushes).
COPY_SLICE_ROWS = 64


async def _copy_rows(rows: Sequence[AuditRecord]) -> AsyncIterator[tuple[object, ...]]:
    for i, r in enumerate(rows):
        if i and i % COPY_SLICE_ROWS == 0:
            await asyncio.sleep(0)
        yield _copy_row(r)


async def _write_batch(conn: asyncpg.Connection, rows: Sequence[AuditRecord]) -> int:
    """One transaction; returns how many rows were new."""
    async with conn.transaction():
        await conn.execute(CREATE_STAGING)
        await conn.copy_records_to_table(
            STAGING, schema_name="pg_temp", records=_copy_rows(rows), columns=COLUMNS
        )
        inserted: int = await conn.fetchval(WRITE_BATCH)
    return inserted


class _Flusher(Job):
    """The sink's flusher on the common job base. Its loop handles a database that is away
    itself (backoff, spool); the base restarts it after anything its loop did not expect."""

    def __init__(self, sink: PostgresAuditSink, **job_options: Any) -> None:
        super().__init__("audit-flusher", **job_options)
        self._sink = sink

    async def run(self) -> None:
        await self._sink._run()

    def wake(self) -> None:
        self._sink._wake.set()


def _describe(e: BaseException) -> str:
    detail = " ".join(str(e).split())[:200]
    return f"{type(e).__name__}: {detail}" if detail else type(e).__name__


class PostgresAuditSink:
    def __init__(
        self,
        dsn: str,
        settings: AuditSettings,
        *,
        spool: Spool | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._dsn = dsn
        self._interval = settings.flush_interval_ms / 1000
        self._batch_max = settings.batch_max_rows
        self._buffer_max = settings.buffer_max_rows
        self._timeout = settings.write_timeout_s
        self._drain_timeout = settings.drain_timeout_s
        self._spool = spool or Spool(settings.spool_dir, settings.spool_max_bytes)
        self._jitter = jitter
        self._buffer: list[AuditRecord] = []
        self._months: set[date] = set()  # partitions known to exist
        self._wake = asyncio.Event()
        self.job = _Flusher(self, stop_timeout_s=2 * self._timeout + 30)
        self._closed = False
        self._pool: asyncpg.Pool | None = None
        self.counters = AuditCounters()

    @property
    def queue_depth(self) -> int:
        return len(self._buffer)

    # -- the request path -----------------------------------------------------------------------

    def submit(self, record: AuditRecord) -> None:
        if self._closed:  # cannot happen: cleanup runs after the last request finished
            self._drop(1, "submitted after shutdown")
            return
        self._buffer.append(record)
        n = len(self._buffer)
        if n == self._batch_max or n > self._buffer_max:
            self._wake.set()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            recovered = await asyncio.to_thread(self._spool.prepare)
        except OSError as e:
            raise ConfigError(cannot_use(self._spool.directory, str(e.strerror or e))) from None
        if recovered:
            log.warning("audit spool: took back %d files left by stopped processes", recovered)
        # One connection: the flusher is the only user, and a separate pool keeps audit
        # writes from ever queueing ahead of request-path lookups in the identity store's.
        self._pool = await create_pool(self._dsn, timeout_s=self._timeout, max_size=1)
        self.job.start()

    async def close(self) -> None:
        """Write what is queued (CONTRACT §9: nothing lost on SIGTERM), else spool it; bounded
        by about write_timeout_s (a batch in flight) + drain_timeout_s + the spool writes."""
        await self.job.stop()  # returns after its current step; each step is bounded
        if self._pool is not None:
            try:
                async with asyncio.timeout(self._drain_timeout):
                    await self._flush_buffer()
            except (_Unavailable, TimeoutError) as e:
                log.warning(
                    "audit: %d rows not written at shutdown (%s); spooling them",
                    len(self._buffer),
                    str(e) or "drain_timeout_s passed",
                )
        await self._spill(keep=0)
        self._closed = True
        if self._pool is not None:
            await close_pool(self._pool, self._timeout)

    # -- the flusher ----------------------------------------------------------------------------

    async def _run(self) -> None:
        # The first round runs at once: a spool left by an earlier process is replayed now.
        failures = 0
        while not self.job.stopping:
            try:
                await self._flush_buffer()
                await self._replay_spool()
            except Exception as e:
                failures += 1
                if isinstance(e, _Unavailable):
                    log.warning("audit rows not written (%s); %d queued", e, len(self._buffer))
                else:  # a bug: it must not stop auditing, nor print a traceback
                    log.error("audit flusher error: %s", _describe(e))
                await self._spill(keep=self._buffer_max)
            else:
                if failures:
                    log.warning("audit writes resumed after %d failed attempts", failures)
                failures = 0
            await self._pause(self._backoff(failures) if failures else None)

    def _backoff(self, failures: int) -> float:
        return backoff_s(
            failures, base_s=BACKOFF_BASE_S, cap_s=BACKOFF_CAP_S, jitter=self._jitter()
        )

    async def _pause(self, backoff_s: float | None) -> None:
        """Healthy (``None``): wait for a full batch or the flush interval. Backing off: wait
        ``backoff_s``, spilling to the spool whenever the buffer passes its limit."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._interval if backoff_s is None else backoff_s)
        while not self.job.stopping:
            if backoff_s is None and len(self._buffer) >= self._batch_max:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            if backoff_s is not None:
                await self._spill(keep=self._buffer_max)

    async def _flush_buffer(self) -> None:
        # Only this task removes rows, and only from the front: what submit() appends while a
        # write is in flight stays behind the batch being written. A round writes the rows
        # queued when it began and no more: "until the buffer is empty" never ended under
        # steady traffic, and wrote one transaction per couple of rows instead of one per
        # interval (3,417 batches for 9,100 rows at 1,300 req/s, ~85 us of CPU per request).
        due = len(self._buffer)
        while due > 0 and self._buffer:
            n = min(due, len(self._buffer), self._batch_max)
            await self._write(self._buffer[:n])
            del self._buffer[:n]
            due -= n
            # Postgres answers, but slower than rows arrive: memory stays bounded all the same.
            await self._spill(keep=self._buffer_max)

    async def _replay_spool(self) -> None:
        # Between files, the buffer goes first if it filled a batch meanwhile.
        while not self.job.stopping and len(self._buffer) < self._batch_max:
            try:
                claimed = await asyncio.to_thread(self._spool.claim_next)
            except OSError as e:
                log.error("audit spool %s unreadable: %s", self._spool.directory, e.strerror)
                return
            if claimed is None:
                return
            try:
                await self._write(claimed.records)
            except BaseException:
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(self._spool.release, claimed)
                raise
            if claimed.unreadable_lines:
                self._drop(claimed.unreadable_lines, f"unreadable in {claimed.path.name}")
            await asyncio.to_thread(self._spool.delete, claimed)
            self.counters.rows_replayed += len(claimed.records)

    async def _spill(self, *, keep: int) -> None:
        """Move the oldest rows to the spool, a batch per file, until at most ``keep`` remain."""
        while len(self._buffer) > keep:
            batch = self._buffer[: self._batch_max]
            try:
                spooled = await asyncio.to_thread(self._spool.write, batch)
            except OSError as e:
                self._drop(len(batch), f"{self._spool.directory} not writable: {e.strerror}")
            else:
                if spooled:
                    self.counters.rows_spooled += len(batch)
                else:
                    self._drop(len(batch), f"spool full ({self._spool.max_bytes} bytes)")
            del self._buffer[: len(batch)]

    # -- one batch ------------------------------------------------------------------------------

    async def _write(self, rows: Sequence[AuditRecord]) -> None:
        """Commit ``rows`` exactly once, or raise ``_Unavailable`` having committed nothing."""
        if not rows:
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await self._ensure_partitions(rows)
            inserted = await run_bounded(
                self._pool_or_fail(), partial(_write_batch, rows=rows), self._timeout
            )
        except _ENCODING_ERRORS as e:
            await self._write_checked(rows, e)
            return
        except DB_ERRORS as e:
            if isinstance(e, asyncpg.DataError):  # SQLSTATE class 22: retrying cannot help
                await self._isolate(rows, e)
                return
            self._months.clear()  # a partition may have been dropped: check them again
            self.counters.write_errors += 1
            raise _Unavailable(_describe(e)) from None
        c = self.counters
        c.batches += 1
        c.rows_written += len(rows)
        c.rows_duplicate += len(rows) - inserted
        c.last_flush_ms = (loop.time() - started) * 1000

    async def _write_checked(self, rows: Sequence[AuditRecord], e: BaseException) -> None:
        checked: list[AuditRecord] = []
        for r in rows:
            try:
                checked.append(_checked(r))
            except ValueError as bad:
                self._drop(1, f"malformed row {r.request_id!r}: {bad}")
        if checked == list(rows):  # nothing to mend: not a row's fault after all
            raise _Unavailable(_describe(e)) from None
        await self._write(checked)

    async def _isolate(self, rows: Sequence[AuditRecord], e: BaseException) -> None:
        if len(rows) == 1:
            self._drop(1, f"rejected by Postgres: {_describe(e)}")
            return
        half = len(rows) // 2
        await self._write(rows[:half])
        await self._write(rows[half:])

    async def _ensure_partitions(self, rows: Sequence[AuditRecord]) -> None:
        for month in sorted({month_of(r.created_at) for r in rows} - self._months):
            made = await run_bounded(
                self._pool_or_fail(), partial(ensure_partition, month=month), self._timeout
            )
            if made.created:
                log.info("audit: created partition identity.%s", made.name)
            self._months.add(month)

    def _pool_or_fail(self) -> asyncpg.Pool:
        assert self._pool is not None, "start() first"
        return self._pool

    # -- losses ---------------------------------------------------------------------------------

    def _drop(self, n: int, why: str) -> None:
        self.counters.rows_dropped += n
        log.error(
            "AUDIT ROWS DROPPED: %d rows lost (%s); %d dropped since start",
            n,
            why,
            self.counters.rows_dropped,
        )
