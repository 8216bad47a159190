"""Helpers shared by the database-mode e2e tests."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from proxy.migrate import apply_migrations


async def within(seconds: float, check: Callable[[], Awaitable[bool]]) -> float:
    """Poll ``check`` until it is true; return how long that took; fail past the deadline."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > seconds:
            pytest.fail(f"not true within {seconds}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def statement_calls(db: asyncpg.Connection, fragment: str) -> int:
    """How often this database ran statements containing ``fragment`` (pg_stat_statements)."""
    n = await db.fetchval(
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d"
        " ON d.oid = s.dbid WHERE d.datname = current_database() AND s.query LIKE $1",
        f"%{fragment}%",
    )
    return int(n)


def seeded_database(
    server: Any, prefix: str, seed: Callable[[asyncpg.Connection], Awaitable[None]]
) -> str:
    """A fresh database on ``server``: migrated, pg_stat_statements on, then ``seed(conn)``."""
    url: str = server.create_database(f"{prefix}_{uuid.uuid4().hex[:10]}")

    async def run() -> None:
        await apply_migrations(url)
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await seed(conn)
        finally:
            await conn.close()

    asyncio.run(run())
    return url
