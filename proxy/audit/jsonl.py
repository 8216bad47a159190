"""Embedded-mode audit sink: rows appended to a JSON-lines file in batches, off the request path.

``submit`` only appends to a list; a background task writes what has accumulated every
``flush_interval_ms`` in a worker thread (file I/O never runs on the event loop), and ``close``
writes the rest, so a SIGTERM loses nothing that was submitted.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import orjson

from proxy.audit.record import AuditRecord
from proxy.background import Periodic

log = logging.getLogger("proxy.audit")


class JsonlAuditSink:
    def __init__(self, path: Path, flush_interval_ms: int) -> None:
        self._path = path
        self._pending: list[AuditRecord] = []
        self.job = Periodic("audit-jsonl", flush_interval_ms / 1000, self.flush)
        self.rows_written = 0

    def submit(self, record: AuditRecord) -> None:
        self._pending.append(record)

    def _write(self, rows: list[AuditRecord]) -> None:
        data = b"".join(orjson.dumps(r.as_json_row()) + b"\n" for r in rows)
        with self._path.open("ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    async def flush(self) -> None:
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        try:
            await asyncio.to_thread(self._write, rows)
        except OSError as e:
            self._pending[:0] = rows  # keep them for the next attempt, in order
            log.error("audit file %s not writable: %s", self._path, e.strerror)
            return
        self.rows_written += len(rows)

    async def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self.job.start()

    async def close(self) -> None:
        await self.job.stop()  # between two flushes, then the last one
