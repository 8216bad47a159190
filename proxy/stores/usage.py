"""API-key usage (``usage_count``, ``last_used_at``, ``last_used_ip``) aggregated in memory and
written in one batched statement per flush interval, never per request (CONTRACT §5).

A write that fails, or is cancelled, is merged back into what accumulates next, so an outage
delays counts rather than losing them; ``close`` stops the flush job between rounds and writes the
remainder (SIGTERM loses nothing that was recorded).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from proxy.background import Periodic
from proxy.errors import TenantStoreUnavailable

log = logging.getLogger("proxy.usage")
# Keys per statement. Each write is bounded by the store's timeout (tenancy.store_timeout_s): a
# backlog of tens of thousands of keys (a burst of new keys, an outage) in one statement missed
# it every time on a loaded machine, and was never written; chunks of this size each fit.
MAX_KEYS_PER_WRITE = 1000


@dataclass(slots=True)
class KeyUsage:
    count: int
    last_used_at: datetime
    last_used_ip: str | None

    def merge(self, other: KeyUsage) -> None:
        self.count += other.count
        if other.last_used_at >= self.last_used_at:
            self.last_used_at, self.last_used_ip = other.last_used_at, other.last_used_ip


class UsageRecorder:
    def __init__(
        self,
        write: Callable[[dict[str, KeyUsage]], Awaitable[None]],
        interval_s: float,
        max_keys_per_write: int = MAX_KEYS_PER_WRITE,
    ) -> None:
        self._write = write
        self._chunk = max_keys_per_write
        self._pending: dict[str, KeyUsage] = {}
        self.job = Periodic("key-usage", interval_s, self.flush)

    def record(self, key_id: str, at: datetime, ip: str | None) -> None:
        usage = self._pending.get(key_id)
        if usage is None:
            self._pending[key_id] = KeyUsage(1, at, ip)
        else:
            usage.merge(KeyUsage(1, at, ip))

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        keys = list(batch)
        for start in range(0, len(keys), self._chunk):
            chunk = {k: batch[k] for k in keys[start : start + self._chunk]}
            try:
                await self._write(chunk)
            except TenantStoreUnavailable:
                self._keep({k: batch[k] for k in keys[start:]})
                log.warning("key usage not written (%d keys pending)", len(self._pending))
                return
            except BaseException:
                # Anything else (a bug, or the job cancelled mid-write): what was not written
                # is not lost either. A cancelled write either committed or rolled back as a
                # whole; keeping it may count it twice in the rare first case, never drop it.
                self._keep({k: batch[k] for k in keys[start:]})
                raise

    def _keep(self, batch: dict[str, KeyUsage]) -> None:
        """Put a batch that was not written back in front of what accumulated since."""
        for key_id, usage in batch.items():
            if key_id in self._pending:
                usage.merge(self._pending[key_id])
            self._pending[key_id] = usage

    @property
    def pending_keys(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self.job.start()

    async def close(self) -> None:
        await self.job.stop()  # ends between two flushes, then flushes what remains


class NoUsage:
    """Embedded mode: there is no key table to write usage to."""

    def record(self, key_id: str, at: datetime, ip: str | None) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass
