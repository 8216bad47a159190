"""Every name in memory (stores.preload) against a real Postgres: loaded from one snapshot at
start-up, kept current by NOTIFY, an insert, update or delete made during the preload not lost,
and unknown names answered with no query once it is complete."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from proxy.core.tenancy import Tenant
from proxy.stores.identity import CachedIdentityStore
from tests.e2e.support import seeded_database, statement_calls, within
from tests.servers import PostgresServer

TENANTS = 300
KEY = "fr_live_" + "Q" * 40
LATE_KEY = "fr_live_" + "L" * 40
BY_SLUG = "t.slug = $1::citext"
BY_PREFIX = "WHERE key_prefix = $1"


async def _seed(conn: asyncpg.Connection) -> None:
    await conn.execute(
        """INSERT INTO identity.tenants (id, slug, name, status, custom_domain, domain_verified)
           SELECT ('20000000-0000-0000-0000-' || lpad(i::text, 12, '0'))::uuid, 'p' || i,
                  'P' || i, 'Active', CASE WHEN i = 1 THEN 'videos.p1.test' END, i = 1
             FROM generate_series(0, $1 - 1) i""",
        TENANTS,
    )
    await _add_key(conn, "20000000-0000-0000-0000-000000000003", KEY)


async def _add_key(conn: asyncpg.Connection, tenant: str, key: str) -> None:
    await conn.execute(
        "INSERT INTO identity.tenant_api_keys (tenant_id, name, key_prefix, key_hash, last4)"
        " VALUES ($1, 'k', $2, $3, $4)",
        tenant,
        key[:12],
        hashlib.sha256(key.encode()).hexdigest(),
        key[-4:],
    )


def _store(dsn: str) -> CachedIdentityStore:
    return CachedIdentityStore(
        dsn,
        ttl_s=30,
        stale_if_error_s=300,
        timeout_s=5,
        max_miss_lookups_per_s=200,
        preload_max_entries=10_000,
    )


async def test_changes_made_during_the_preload_are_not_lost(
    postgres_server: PostgresServer,
) -> None:
    dsn = await asyncio.to_thread(seeded_database, postgres_server, "preload", _seed)
    store = _store(dsn)
    streamed, changed = asyncio.Event(), asyncio.Event()
    real = store.db.stream_names

    async def paused(
        max_entries: int, on_tenant: Callable[[Tenant], None], on_prefix: Callable[[str], None]
    ) -> int | None:
        """The snapshot's rows reach the store half before and half after the changes below
        were committed and notified: both orders of a row and its notification."""
        tenants: list[Tenant] = []
        prefixes: list[str] = []
        n = await real(max_entries, tenants.append, prefixes.append)
        for t in tenants[: len(tenants) // 2]:
            on_tenant(t)
        streamed.set()
        await changed.wait()
        for t in tenants[len(tenants) // 2 :]:
            on_tenant(t)
        for p in prefixes:
            on_prefix(p)
        return n

    store.db.stream_names = paused  # type: ignore[method-assign]
    db = await asyncpg.connect(dsn)
    try:
        await store.start()
        await asyncio.wait_for(streamed.wait(), 10)
        assert not await store.ready()  # /readyz stays 503 until the preload is done
        async with db.transaction():
            late = await db.fetchval(
                "INSERT INTO identity.tenants (slug, name, status) VALUES ('late', 'Late',"
                " 'Active') RETURNING id::text"
            )
            await _add_key(db, late, LATE_KEY)
            # p2 streams before the change, p299 after it (the snapshot has the old rows).
            await db.execute(
                "UPDATE identity.tenants SET status = 'Suspended' WHERE slug IN ('p2', 'p299')"
            )
            await db.execute(
                "UPDATE identity.tenants SET deleted_at = now() WHERE slug IN ('p4', 'p298')"
            )

        async def notified() -> bool:
            return "late" in store.index.slugs and LATE_KEY[:12] in store.index.prefixes

        await within(5, notified)
        changed.set()
        await asyncio.wait_for(store.preloaded.wait(), 10)
        assert store.index.complete and await store.ready()

        for slug in ("p2", "p299"):
            tenant = await store.by_slug(slug)
            assert tenant is not None and tenant.status == "Suspended", slug
        assert await store.by_slug("p4") is None
        assert await store.by_slug("p298") is None
        tenant = await store.by_slug("late")
        assert tenant is not None and tenant.id == late
        assert [k.tenant_id for k in await store.by_prefix(LATE_KEY[:12])] == [late]
    finally:
        await store.close()
        await db.close()


async def test_unknown_names_cost_no_query_and_known_ones_no_miss(
    postgres_server: PostgresServer,
) -> None:
    dsn = await asyncio.to_thread(seeded_database, postgres_server, "preload", _seed)
    store = _store(dsn)
    db = await asyncpg.connect(dsn)
    try:
        await store.start()
        await asyncio.wait_for(store.preloaded.wait(), 10)
        await db.execute("SELECT pg_stat_statements_reset()")
        for i in range(TENANTS):
            tenant = store.cached_tenant("slug", f"P{i}")  # answered without waiting
            assert isinstance(tenant, Tenant) and tenant.slug == f"p{i}"
        assert store.cached_tenant("domain", "videos.p1.test").slug == "p1"  # type: ignore[union-attr]
        for i in range(50):
            assert await store.by_slug(f"nobody{i}") is None
            assert await store.by_custom_domain(f"nobody{i}.example") is None
            assert await store.by_prefix(f"fr_live_{i:04d}") == ()
        assert await statement_calls(db, BY_SLUG) == 0
        assert await statement_calls(db, "t.custom_domain = $1::citext") == 0
        assert await statement_calls(db, BY_PREFIX) == 0
        assert [k.key_prefix for k in await store.by_prefix(KEY[:12])] == [KEY[:12]]

        # A name that becomes known after the preload: NOTIFY, then one query.
        await db.execute(
            "INSERT INTO identity.tenants (slug, name, status) VALUES ('newer', 'N', 'Active')"
        )

        async def known() -> bool:
            return await store.by_slug("newer") is not None

        await within(2, known)
    finally:
        await store.close()
        await db.close()


async def test_above_the_limit_names_are_looked_up_on_use(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = await asyncio.to_thread(seeded_database, postgres_server, "preload", _seed)
    options: dict[str, Any] = {"preload_max_entries": TENANTS}  # + 1 prefix: one too many
    store = CachedIdentityStore(
        dsn, ttl_s=30, stale_if_error_s=300, timeout_s=5, max_miss_lookups_per_s=200, **options
    )
    db = await asyncpg.connect(dsn)
    try:
        await store.start()
        await asyncio.wait_for(store.preloaded.wait(), 10)
        assert not store.index.complete
        await db.execute("SELECT pg_stat_statements_reset()")
        assert await store.by_slug("nobody") is None
        assert await statement_calls(db, BY_SLUG) == 1
    finally:
        await store.close()
        await db.close()
