"""``python -m proxy partitions ensure [--months-ahead N]`` (CONTRACT §1): idempotent, UTC month
bounds, one-line errors."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from proxy.audit.partitions import month_of, months_from
from tests.e2e.test_cli import assert_one_line_error, run
from tests.procs import free_port
from tests.servers import PostgresServer


def _names(ahead: int) -> list[str]:
    months = months_from(month_of(datetime.now(UTC)), ahead)
    return [f"identity.tenant_api_request_logs_y{m.year}m{m.month:02d}" for m in months]


async def _bounds(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """SELECT c.oid::regclass::text AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
                 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = 'identity.tenant_api_request_logs'::regclass"""
        )
    finally:
        await conn.close()
    return {r["name"]: r["bound"] for r in rows}


def test_ensure_creates_this_month_and_n_ahead_then_changes_nothing(migrated_dsn: str) -> None:
    env = {"DATABASE_URL": migrated_dsn}
    first = run("partitions", "ensure", "--months-ahead", "2", env=env)
    assert first.returncode == 0, first.stderr
    names = _names(2)
    assert first.stdout.splitlines() == [f"created {n}" for n in names]
    again = run("partitions", "ensure", env=env)  # default: 3 months ahead
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [f"exists {n}" for n in names] + [
        f"created {_names(3)[-1]}"
    ]
    bounds = asyncio.run(_bounds(migrated_dsn))
    assert set(bounds) == {"identity.tenant_api_request_logs_y2026m01", *_names(3)}
    first_month = months_from(month_of(datetime.now(UTC)), 1)
    # UTC midnights, whatever the session's time zone.
    assert bounds[names[0]] == (
        f"FOR VALUES FROM ('{first_month[0]} 00:00:00+00') TO ('{first_month[1]} 00:00:00+00')"
    )


def test_months_ahead_zero_is_this_month_only(migrated_dsn: str) -> None:
    result = run("partitions", "ensure", "--months-ahead", "0", env={"DATABASE_URL": migrated_dsn})
    assert result.returncode == 0 and result.stdout.splitlines() == [f"created {_names(0)[0]}"]


@pytest.mark.parametrize("value", ["-1", "two", "1.5", "121", ""])
def test_bad_months_ahead_is_one_line(value: str) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/x"  # never reached
    result = run("partitions", "ensure", "--months-ahead", value, env={"DATABASE_URL": dsn})
    assert_one_line_error(result, "--months-ahead")


def test_database_problems_are_one_line(postgres_server: PostgresServer) -> None:
    assert_one_line_error(run("partitions", "ensure"), "DATABASE_URL")
    dsn = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/x"
    result = run("partitions", "ensure", env={"DATABASE_URL": dsn})
    assert_one_line_error(result, "unreachable")
    assert "hunter2" not in result.stderr
    bare = postgres_server.create_database(f"bare_{uuid.uuid4().hex[:10]}")
    try:
        result = run("partitions", "ensure", env={"DATABASE_URL": bare})
        assert_one_line_error(result, "migrate")
    finally:
        postgres_server.drop_database(bare.rsplit("/", 1)[1])
    assert_one_line_error(run("partitions"), "ensure")  # no sub-command
