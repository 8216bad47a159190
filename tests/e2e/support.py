"""Helpers shared by the database-mode e2e tests."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
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


async def add_tenant(db: asyncpg.Connection, slug: str, **cols: object) -> str:
    """Insert a tenant row (name from the slug, other columns as given); returns its id."""
    tid = str(uuid.uuid4())
    names = ["id", "slug", "name", *cols]
    values = [tid, slug, slug.title(), *cols.values()]
    marks = ", ".join(f"${i + 1}" for i in range(len(values)))
    await db.execute(f"INSERT INTO identity.tenants ({', '.join(names)}) VALUES ({marks})", *values)
    return tid


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


_ROOT = Path(__file__).resolve().parents[2]


async def run_cli(*args: str, env: Mapping[str, str]) -> tuple[int, str, str]:
    """``python -m proxy ARGS`` in the repository, with ``env`` over a copy of this process's
    environment without its DATABASE_URL and EDGE_CONFIG: (exit status, stdout, stderr)."""
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "EDGE_CONFIG")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        cwd=_ROOT,
        env={**base, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()
