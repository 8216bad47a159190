"""`apply_migrations` against a real throwaway Postgres (tests/servers.py)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import pytest_asyncio

from proxy.migrate import DEFAULT_SQL_DIR, MigrationError, apply_migrations, discover_migrations

if TYPE_CHECKING:
    from tests.servers import PostgresServer

ALL = [
    "001_prelude.sql",
    "002_identity_tenants.sql",
    "003_edge_invalidation.sql",
    "004_edge_audit.sql",
    "005_edge_outbox.sql",
    "006_edge_domains.sql",
    "009_edge_scale.sql",
    "010_edge_webhooks_fixes.sql",
]
DEFAULT_TENANT = uuid.UUID("00000000-0000-0000-0000-000000000001")
IDENTITY_TABLES = {
    "tenants",
    "tenant_branding",
    "tenant_settings",
    "tenant_api_keys",
    "tenant_webhooks",
    "tenant_webhook_deliveries",
    "tenant_usage_daily",
    "tenant_api_request_logs",
    "tenant_api_request_logs_y2026m01",
    "tenant_domain_verifications",
}


@pytest_asyncio.fixture
async def empty_dsn(postgres_server: PostgresServer) -> AsyncIterator[str]:
    name = f"edge_migrate_{uuid.uuid4().hex[:12]}"
    dsn = await asyncio.to_thread(postgres_server.create_database, name)
    try:
        yield dsn
    finally:
        await postgres_server.astart()
        await asyncio.to_thread(postgres_server.drop_database, name)


@pytest.fixture
def sql_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "sql"
    directory.mkdir()
    return directory


async def fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def table_exists(dsn: str, qualified: str) -> bool:
    rows = await fetch(dsn, "SELECT to_regclass($1) IS NOT NULL AS present", qualified)
    return bool(rows[0]["present"])


async def snapshot(dsn: str) -> dict[str, Any]:
    """Everything a re-run could change: relations, types, functions, row counts, records."""
    relations = await fetch(
        dsn,
        """SELECT n.nspname, c.relname, c.relkind, c.oid::int AS oid
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname IN ('identity', 'public') ORDER BY 1, 2""",
    )
    types = await fetch(
        dsn,
        """SELECT t.typname, t.oid::int AS oid FROM pg_type t
             JOIN pg_namespace n ON n.oid = t.typnamespace
            WHERE n.nspname = 'identity' ORDER BY 1""",
    )
    functions = await fetch(
        dsn,
        "SELECT oid::int AS oid, proname FROM pg_proc WHERE proname = 'tg_set_updated_at'",
    )
    counts = {}
    for rel in relations:
        if rel["relkind"] == "r":
            name = f'"{rel["nspname"]}"."{rel["relname"]}"'
            counts[name] = (await fetch(dsn, f"SELECT count(*) AS n FROM {name}"))[0]["n"]
    records = await fetch(
        dsn, "SELECT name, checksum, applied_at FROM public.edge_schema_migrations ORDER BY name"
    )
    return {
        "relations": [tuple(r) for r in relations],
        "types": [tuple(r) for r in types],
        "functions": [tuple(r) for r in functions],
        "counts": counts,
        "records": [tuple(r) for r in records],
    }


def assert_one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message
    assert "\n" not in message
    assert "Traceback" not in message
    return message


# -- the real sql/ directory --------------------------------------------------------------------


async def test_fresh_database_gets_identity_schema_and_default_tenant(empty_dsn: str) -> None:
    assert await apply_migrations(empty_dsn) == ALL

    tables = await fetch(
        empty_dsn,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'identity'",
    )
    assert {r["table_name"] for r in tables} >= IDENTITY_TABLES

    partitions = await fetch(
        empty_dsn,
        """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'identity.tenant_api_request_logs'::regclass""",
    )
    assert [r["relname"] for r in partitions] == ["tenant_api_request_logs_y2026m01"]

    tenant = await fetch(
        empty_dsn,
        "SELECT slug::text, kind::text, status::text FROM identity.tenants WHERE id = $1",
        DEFAULT_TENANT,
    )
    assert [tuple(r) for r in tenant] == [("flatrender", "Internal", "Active")]

    records = await fetch(
        empty_dsn, "SELECT name, checksum FROM public.edge_schema_migrations ORDER BY name"
    )
    on_disk = {m.name: m.checksum for m in discover_migrations(DEFAULT_SQL_DIR)}
    assert {r["name"]: r["checksum"] for r in records} == on_disk


async def test_prelude_trigger_sets_updated_at(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    try:
        await conn.execute(
            "UPDATE identity.tenants SET updated_at = 'epoch', name = name WHERE id = $1",
            DEFAULT_TENANT,
        )
        moved = await conn.fetchval(
            "SELECT updated_at > now() - interval '1 minute' FROM identity.tenants WHERE id = $1",
            DEFAULT_TENANT,
        )
    finally:
        await conn.close()
    assert moved is True


async def test_second_run_applies_and_changes_nothing(migrated_dsn: str) -> None:
    before = await snapshot(migrated_dsn)
    assert await apply_migrations(migrated_dsn) == []
    assert await snapshot(migrated_dsn) == before


async def test_concurrent_runs_apply_each_file_once(empty_dsn: str) -> None:
    results = await asyncio.gather(*(apply_migrations(empty_dsn) for _ in range(3)))
    assert sorted(results, key=len) == [[], [], ALL]


# -- failures -----------------------------------------------------------------------------------


async def test_failing_migration_leaves_nothing_half_applied(empty_dsn: str, sql_dir: Path) -> None:
    (sql_dir / "001_ok.sql").write_text("CREATE TABLE public.ok_table (x int);\n")
    (sql_dir / "002_broken.sql").write_text(
        "CREATE TABLE public.half_table (x int);\nSELEC oops;\n"
    )

    with pytest.raises(MigrationError) as caught:
        await apply_migrations(empty_dsn, sql_dir)

    message = assert_one_line(caught.value)
    assert message.startswith("migration 002_broken.sql failed: ")
    assert "SELEC" in message and "line 2" in message
    assert await table_exists(empty_dsn, "public.ok_table")
    assert not await table_exists(empty_dsn, "public.half_table")
    records = await fetch(empty_dsn, "SELECT name FROM public.edge_schema_migrations")
    assert [r["name"] for r in records] == ["001_ok.sql"]

    # Fixed, the same file is applied whole next time.
    (sql_dir / "002_broken.sql").write_text("CREATE TABLE public.half_table (x int);\n")
    assert await apply_migrations(empty_dsn, sql_dir) == ["002_broken.sql"]
    assert await table_exists(empty_dsn, "public.half_table")


async def test_edited_applied_migration_is_an_error(empty_dsn: str, sql_dir: Path) -> None:
    (sql_dir / "001_a.sql").write_text("CREATE TABLE public.a (x int);\n")
    assert await apply_migrations(empty_dsn, sql_dir) == ["001_a.sql"]

    (sql_dir / "001_a.sql").write_text("CREATE TABLE public.a (x int, y int);\n")
    (sql_dir / "002_b.sql").write_text("CREATE TABLE public.b (x int);\n")
    with pytest.raises(MigrationError) as caught:
        await apply_migrations(empty_dsn, sql_dir)

    message = assert_one_line(caught.value)
    assert "001_a.sql" in message and "changed" in message
    assert not await table_exists(empty_dsn, "public.b")  # nothing applied past the mismatch


async def test_files_are_applied_in_numeric_order(empty_dsn: str, sql_dir: Path) -> None:
    (sql_dir / "10_second.sql").write_text("CREATE TABLE public.t2 (x int REFERENCES public.t1);")
    (sql_dir / "9_first.sql").write_text("CREATE TABLE public.t1 (x int PRIMARY KEY);")
    (sql_dir / "README.md").write_text("not a migration")
    (sql_dir / "notes.sql").write_text("not a migration either")
    assert await apply_migrations(empty_dsn, sql_dir) == ["9_first.sql", "10_second.sql"]


def test_duplicate_numbers_are_an_error(sql_dir: Path) -> None:
    (sql_dir / "001_a.sql").write_text("SELECT 1;")
    (sql_dir / "001_b.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"001_a\.sql and 001_b\.sql"):
        discover_migrations(sql_dir)


async def test_missing_sql_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="cannot read migrations directory"):
        await apply_migrations("postgresql://postgres@127.0.0.1:1/x", tmp_path / "nope")


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_database_fails_fast_without_password(closed_port: int) -> None:
    dsn = f"postgresql://edge:s3cr3t-pw@127.0.0.1:{closed_port}/edge"
    started = time.monotonic()
    with pytest.raises(MigrationError) as caught:
        await apply_migrations(dsn, timeout=5)
    assert time.monotonic() - started < 5

    message = assert_one_line(caught.value)
    assert message.startswith(f"database unreachable: 127.0.0.1:{closed_port}/edge: ")
    assert "s3cr3t-pw" not in message


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose kernel completes the TCP handshake but nothing ever answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


async def test_silent_database_times_out(silent_port: int) -> None:
    started = time.monotonic()
    with pytest.raises(MigrationError) as caught:
        await apply_migrations(f"postgresql://postgres@127.0.0.1:{silent_port}/x", timeout=0.5)
    assert time.monotonic() - started < 3
    assert assert_one_line(caught.value) == (
        f"database unreachable: 127.0.0.1:{silent_port}/x: no answer within 0.5s"
    )


async def test_missing_database_is_one_line(postgres_server: PostgresServer) -> None:
    with pytest.raises(MigrationError) as caught:
        await apply_migrations(postgres_server.dsn_for("no_such_db"))
    message = assert_one_line(caught.value)
    assert message.startswith("cannot connect to database ")
    assert "no_such_db" in message


async def test_broken_copy_of_real_migrations(empty_dsn: str, sql_dir: Path) -> None:
    """A failure in the real 002 (here: appended garbage) rolls back all of 002."""
    shutil.copy(DEFAULT_SQL_DIR / "001_prelude.sql", sql_dir)
    broken = (DEFAULT_SQL_DIR / "002_identity_tenants.sql").read_text() + "\nSELEC;\n"
    (sql_dir / "002_identity_tenants.sql").write_text(broken)

    with pytest.raises(MigrationError, match=r"^migration 002_identity_tenants\.sql failed: "):
        await apply_migrations(empty_dsn, sql_dir)
    assert await table_exists(empty_dsn, "public.edge_schema_migrations")
    assert not await table_exists(empty_dsn, "identity.tenants")
    types = await fetch(empty_dsn, "SELECT 1 FROM pg_type WHERE typname = 'tenant_status'")
    assert types == []
