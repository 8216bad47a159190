"""The identity store against a real Postgres: a lookup is one statement (releasing the
connection sends nothing: asyncpg's default reset is a second transaction per lookup), and the
key-usage writes are heap-only updates."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg

from proxy.stores.postgres import KEYS_BY_PREFIX, PostgresStore, create_pool, run_bounded
from proxy.stores.usage import KeyUsage
from tests.e2e.support import seeded_database, statement_calls, within
from tests.servers import PostgresServer

TENANT = "cccccccc-0000-0000-0000-000000000019"


async def _noop(_conn: asyncpg.Connection) -> None:
    pass


async def test_a_lookup_is_one_statement_and_release_sends_no_reset_query(
    postgres_server: PostgresServer,
) -> None:
    dsn = await asyncio.to_thread(seeded_database, postgres_server, "pool", _noop)
    db = await asyncpg.connect(dsn)
    store = PostgresStore(dsn, timeout_s=5, max_connections=2)
    await store.start()
    try:
        before = await statement_calls(db, "pg_advisory_unlock_all")
        for _ in range(5):
            assert await store.keys_by_prefix("fr_live_abcd") == ()
        assert await statement_calls(db, "pg_advisory_unlock_all") == before
        assert await statement_calls(db, KEYS_BY_PREFIX.strip().splitlines()[-1]) == 5
    finally:
        await store.close()
        await db.close()


async def test_a_transaction_left_open_is_still_rolled_back_on_release(
    postgres_server: PostgresServer,
) -> None:
    dsn = await asyncio.to_thread(seeded_database, postgres_server, "pool", _noop)
    pool = await create_pool(dsn, timeout_s=5, max_size=1, reset_on_release=False)
    try:

        async def leave_open(conn: asyncpg.Connection) -> None:
            await conn.execute("BEGIN; CREATE TEMP TABLE left_open (x int)")

        await run_bounded(pool, leave_open, 5)
        exists = await run_bounded(
            pool, lambda c: c.fetchval("SELECT to_regclass('pg_temp.left_open')"), 5
        )
        assert exists is None
    finally:
        await pool.close()


async def _seed_keys(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO identity.tenants (id, slug, name, status) VALUES ($1, 'hot', 'Hot', 'Active')",
        TENANT,
    )
    await conn.execute(
        """INSERT INTO identity.tenant_api_keys
               (tenant_id, name, environment, key_prefix, key_hash, last4, scopes)
           SELECT $1, 'k' || i, 'Live', 'fr_live_' || lpad(i::text, 4, '0'),
                  encode(sha256(('key' || i)::bytea), 'hex'), lpad(i::text, 4, '0'),
                  '{renders:read,renders:create}'
             FROM generate_series(1, 2000) i""",
        TENANT,
    )


async def test_usage_writes_stay_heap_only_updates(postgres_server: PostgresServer) -> None:
    """fillfactor (009_edge_scale.sql) leaves room for the new row version on its page: the
    usage writes of a key table whose pages the inserts filled are HOT, not index writes."""
    dsn = await asyncio.to_thread(seeded_database, postgres_server, "hot", _seed_keys)
    db = await asyncpg.connect(dsn)
    store = PostgresStore(dsn, timeout_s=5)
    await store.start()
    try:
        ids = [
            r["id"] for r in await db.fetch("SELECT id::text AS id FROM identity.tenant_api_keys")
        ][::10]  # the keys in use: a few per page, as with many tenants
        for minute in range(6):
            at = datetime(2026, 12, 7, 12, minute, tzinfo=UTC)
            await store.write_usage({i: KeyUsage(3, at, "192.0.2.1") for i in ids})
        await store.close()  # its backends report their statistics as they exit
        updates = 6 * len(ids)
        counts: dict[str, int] = {}

        async def reported() -> bool:  # reported asynchronously
            row = await db.fetchrow(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                " WHERE schemaname = 'identity' AND relname = 'tenant_api_keys'"
            )
            counts.update(row)
            return bool(row["n_tup_upd"] >= updates)

        await within(15, reported)
        assert counts["n_tup_upd"] == updates
        assert counts["n_tup_hot_upd"] / updates >= 0.9
        assert await db.fetchval(
            "SELECT sum(usage_count) FROM identity.tenant_api_keys"
        ) == 18 * len(ids)
    finally:
        await store.close()
        await db.close()
