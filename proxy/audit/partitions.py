"""Monthly partitions of ``identity.tenant_api_request_logs`` (CONTRACT §1 ``partitions ensure``,
§9: a month boundary never fails a batch).

The work is done by ``identity.edge_ensure_request_log_partition`` (``sql/004_edge_audit.sql``),
so that the flusher and the CLI create partitions by the same rules: UTC month bounds, the
seed's ``tenant_api_request_logs_yYYYYmMM`` names, and safe when several processes race.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

import asyncpg

ENSURE_PARTITION = (
    "SELECT partition_name, created FROM identity.edge_ensure_request_log_partition($1::date)"
)


@dataclass(frozen=True, slots=True)
class Partition:
    name: str  # in schema identity
    created: bool  # False: it was already there


def month_of(at: datetime) -> date:
    """The first day of the UTC month of ``at`` (an aware datetime)."""
    utc = at.astimezone(UTC)
    return date(utc.year, utc.month, 1)


def months_from(first: date, ahead: int) -> list[date]:
    """The month of ``first`` and the ``ahead`` months after it."""
    index = first.year * 12 + first.month - 1
    return [date((index + i) // 12, (index + i) % 12 + 1, 1) for i in range(ahead + 1)]


async def ensure_partition(conn: asyncpg.Connection, month: date) -> Partition:
    row = await conn.fetchrow(ENSURE_PARTITION, month)
    return Partition(row["partition_name"], row["created"])
