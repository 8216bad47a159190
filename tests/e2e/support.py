"""Helpers shared by the database-mode e2e tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg
import pytest


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
