"""Tenancy from real Postgres through a real proxy process (CONTRACT §3): status rules, changes
reaching the proxy within 1 s by LISTEN/NOTIFY, one query per cold host, stale-if-error."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import string
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.e2e.support import add_tenant, seeded_database, statement_calls, within
from tests.procs import Echo, Proxy, free_port, start_proxy, stop, write_config
from tests.servers import PostgresServer

ACME = "bbbbbbbb-0000-0000-0000-000000000001"
PAGE = "https://www.acme.test"


@pytest.fixture(scope="module")
def dsn(postgres_server: PostgresServer) -> str:
    async def seed(conn: asyncpg.Connection) -> None:
        await conn.execute(
            """INSERT INTO identity.tenants
               (id, slug, name, status, custom_domain, domain_verified, allowed_origins)
               VALUES ($1, 'acme', 'Acme', 'Active', 'videos.acme.test', true, $2)""",
            ACME,
            [PAGE],
        )
        await conn.execute(
            """INSERT INTO identity.tenant_branding (tenant_id, embed_enabled,
               embed_allowed_hosts) VALUES ($1, true, '{https://www.acme.test}')""",
            ACME,
        )

    return seeded_database(postgres_server, "tenancy", seed)


def _config(tmp: Path, echo: Echo, **tenancy: object) -> Path:
    return write_config(
        tmp / "edge.toml",
        # Names looked up on use, as above tenancy.preload_max_entries: the caches, queries and
        # stale serving tested here (test_preload_postgres.py: the names held in memory).
        tenancy={"platform_domains": ["flatrender.test"], "preload_max_entries": 0, **tenancy},
        upstreams={"render-api": {"urls": [echo.url]}},
        routes=[
            {
                "prefix": "/v1/renders",
                "upstream": "render-api",
                "auth": "api_key",
                "scopes": {"GET": "renders:read"},
            },
            {"prefix": "/public", "upstream": "render-api", "auth": "none"},
            {"prefix": "/embed/", "upstream": "render-api", "auth": "none", "embed": True},
        ],
    )


@pytest.fixture(scope="module")
def proxy(dsn: str, echo: Echo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(_config(tmp_path_factory.mktemp("pg"), echo), env={"DATABASE_URL": dsn})
    yield p
    stop(p.proc)


async def status_of(
    http: aiohttp.ClientSession,
    proxy: Proxy,
    host: str,
    path: str = "/public/x",
    headers: dict[str, str] | None = None,
) -> tuple[int, str | None, aiohttp.typedefs.LooseHeaders]:
    async with http.get(f"{proxy.url}{path}", headers={"Host": host, **(headers or {})}) as r:
        body = await r.json()
        code = body["error"]["code"] if r.status >= 400 else None
        return r.status, code, r.headers


async def test_status_rules(
    proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    past, future = "2020-01-01T00:00:00Z", "2999-01-01T00:00:00Z"
    await add_tenant(db, "trialok", status="Trial", trial_ends_at=_ts(future))
    await add_tenant(db, "trialover", status="Trial", trial_ends_at=_ts(past))
    await add_tenant(db, "frozen", status="Suspended")
    await add_tenant(db, "gone", status="Cancelled")
    await add_tenant(db, "deleted", status="Active", deleted_at=_ts(past))
    await add_tenant(db, "pending", status="Active", custom_domain="videos.pending.test")
    cases = {
        "videos.acme.test": (200, None),
        "acme.flatrender.test": (200, None),
        "flatrender.test": (200, None),
        "trialok.flatrender.test": (200, None),
        "trialover.flatrender.test": (402, "trial_expired"),
        "frozen.flatrender.test": (403, "tenant_suspended"),
        "gone.flatrender.test": (410, "tenant_cancelled"),
        "deleted.flatrender.test": (404, "unknown_host"),
        "videos.pending.test": (421, "domain_not_verified"),
        "nobody.example": (404, "unknown_host"),
    }
    for host, expected in cases.items():
        got = await status_of(http, proxy, host)
        assert got[:2] == expected, host


def _ts(text: str) -> object:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_changes_reach_the_proxy_within_one_second(
    proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    tid = await add_tenant(db, "live1", status="Active")
    assert (await status_of(http, proxy, "live1.flatrender.test"))[0] == 200  # now cached

    await db.execute("UPDATE identity.tenants SET status = 'Suspended' WHERE id = $1", tid)
    took = await within(1.0, lambda: _is(http, proxy, "live1.flatrender.test", 403))
    assert took < 1.0

    # A host that was unknown (and negatively cached) becomes known.
    assert (await status_of(http, proxy, "late.flatrender.test"))[0] == 404
    await add_tenant(db, "late", status="Active")
    await within(1.0, lambda: _is(http, proxy, "late.flatrender.test", 200))

    # A slug renamed: the old host goes, the new one comes.
    await db.execute("UPDATE identity.tenants SET slug = 'later' WHERE slug = 'late'")
    await within(1.0, lambda: _is(http, proxy, "late.flatrender.test", 404))
    await within(1.0, lambda: _is(http, proxy, "later.flatrender.test", 200))

    # Soft delete.
    await db.execute("UPDATE identity.tenants SET deleted_at = now() WHERE slug = 'later'")
    await within(1.0, lambda: _is(http, proxy, "later.flatrender.test", 404))


async def _is(http: aiohttp.ClientSession, proxy: Proxy, host: str, status: int) -> bool:
    return (await status_of(http, proxy, host))[0] == status


async def test_branding_and_origins_changes_apply_within_one_second(
    proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    async def csp() -> str | None:
        async with http.get(f"{proxy.url}/embed/x", headers={"Host": "videos.acme.test"}) as r:
            return r.headers.get("Content-Security-Policy")

    assert await csp() == f"frame-ancestors {PAGE}"
    await db.execute(
        "UPDATE identity.tenant_branding SET embed_enabled = false WHERE tenant_id = $1", ACME
    )
    await within(1.0, lambda: _eq(csp, "frame-ancestors 'self'"))
    await db.execute(
        "UPDATE identity.tenant_branding SET embed_enabled = true WHERE tenant_id = $1", ACME
    )
    await within(1.0, lambda: _eq(csp, f"frame-ancestors {PAGE}"))

    async def acao() -> str | None:
        async with http.get(
            f"{proxy.url}/public/x",
            headers={"Host": "videos.acme.test", "Origin": "https://new.test"},
        ) as r:
            return r.headers.get("Access-Control-Allow-Origin")

    assert await acao() is None
    await db.execute(
        "UPDATE identity.tenants SET allowed_origins = allowed_origins || '{https://new.test}'"
        " WHERE id = $1",
        ACME,
    )
    await within(1.0, lambda: _eq(acao, "https://new.test"))


async def _eq(get: Callable[[], Awaitable[str | None]], want: str) -> bool:
    return await get() == want


ALPHABET = string.ascii_letters + string.digits


async def test_key_revocation_applies_within_one_second(
    proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    key = "fr_live_" + "".join(secrets.choice(ALPHABET) for _ in range(40))
    kid = await db.fetchval(
        """INSERT INTO identity.tenant_api_keys (tenant_id, name, key_prefix, key_hash, last4,
           scopes) VALUES ($1, 'srv', $2, $3, $4, '{renders:read}') RETURNING id::text""",
        ACME,
        key[:12],
        hashlib.sha256(key.encode()).hexdigest(),
        key[-4:],
    )
    auth = {"Authorization": f"Bearer {key}"}

    async def outcome() -> int:
        return (await status_of(http, proxy, "videos.acme.test", "/v1/renders/1", auth))[0]

    assert await outcome() == 200
    await db.execute(
        "UPDATE identity.tenant_api_keys SET revoked_at = now(), is_active = false WHERE id = $1",
        kid,
    )

    async def revoked() -> bool:
        got = await status_of(http, proxy, "videos.acme.test", "/v1/renders/1", auth)
        return got[:2] == (401, "api_key_revoked")

    assert await within(1.0, revoked) < 1.0


async def test_a_thousand_concurrent_cold_requests_make_one_query(
    proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    await add_tenant(db, "cold", status="Active")
    await db.execute("SELECT pg_stat_statements_reset()")

    async def one() -> int:
        # /nowhere: tenant resolution happens, no upstream is involved.
        async with http.get(f"{proxy.url}/nowhere", headers={"Host": "cold.flatrender.test"}) as r:
            await r.read()
            return r.status

    statuses = await asyncio.gather(*(one() for _ in range(1000)))
    assert statuses == [404] * 1000  # resolved, then no_route
    assert await statement_calls(db, "t.slug = $1::citext") == 1
    # A platform name is never a custom domain: not looked up as one at all.
    assert await statement_calls(db, "t.custom_domain = $1::citext") == 0

    # Random unknown hosts: one query each, however often they are repeated.
    await db.execute("SELECT pg_stat_statements_reset()")
    hosts = [f"x{i}.unknown.example" for i in range(20)]
    results = await asyncio.gather(*(status_of(http, proxy, h) for h in hosts for _ in range(10)))
    assert {r[1] for r in results} == {"unknown_host"}
    assert await statement_calls(db, "t.custom_domain = $1::citext") == 20


async def test_challenge_and_tls_ask(
    proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    tid = await add_tenant(db, "onboard", status="Trial", custom_domain="videos.onboard.test")
    await db.execute(
        """INSERT INTO identity.tenant_domain_verifications
           (tenant_id, domain, method, challenge_token, expires_at) VALUES
           ($1, 'videos.onboard.test', 'HTTP_FILE', 'tok-good', now() + interval '1 hour'),
           ($1, 'videos.onboard.test', 'HTTP_FILE', 'tok-old', now() - interval '1 hour'),
           ($1, 'videos.onboard.test', 'DNS_TXT', 'tok-dns', now() + interval '1 hour')""",
        tid,
    )
    url = f"{proxy.url}/.well-known/flatrender-challenge/"
    host = {"Host": "videos.onboard.test"}
    async with http.get(url + "tok-good", headers=host) as r:
        assert r.status == 200 and await r.text() == "tok-good"
        assert r.content_type == "text/plain"
    for token in ("tok-old", "tok-dns", "nope"):
        async with http.get(url + token, headers=host) as r:
            assert r.status == 404, token
    # The domain is not verified yet: normal traffic is refused, TLS is not allowed.
    assert (await status_of(http, proxy, "videos.onboard.test"))[:2] == (421, "domain_not_verified")
    admin = f"http://127.0.0.1:{proxy.admin_port}/tls/allowed?domain="

    async def ask(domain: str) -> int:
        async with http.get(admin + domain) as r:
            return r.status

    assert await ask("videos.onboard.test") == 404
    assert await ask("videos.acme.test") == 200
    assert await ask("nobody.example") == 404
    await db.execute("UPDATE identity.tenants SET domain_verified = true WHERE id = $1", tid)
    await within(1.0, lambda: _status_is(ask, "videos.onboard.test", 200))
    await db.execute("UPDATE identity.tenants SET status = 'Suspended' WHERE id = $1", tid)
    await within(1.0, lambda: _status_is(ask, "videos.onboard.test", 404))


async def _status_is(ask: Callable[[str], Awaitable[int]], domain: str, want: int) -> bool:
    return await ask(domain) == want


async def test_listener_reconnects_and_flushes(
    proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    tid = await add_tenant(db, "relisten", status="Active")
    assert await _is(http, proxy, "relisten.flatrender.test", 200)
    # Kill the proxy's LISTEN connection and change the tenant right away, while it is gone:
    # the notification is lost, and only the flush on reconnect can make the change visible.
    killed = await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = 'flatrender-edge-listener' AND datname = current_database()"
    )
    assert killed == 1
    await db.execute("UPDATE identity.tenants SET status = 'Cancelled' WHERE id = $1", tid)
    await within(3.0, lambda: _is(http, proxy, "relisten.flatrender.test", 410))

    async def listening() -> bool:
        n = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
            " 'flatrender-edge-listener' AND datname = current_database()"
        )
        return bool(n == 1)

    await within(3.0, listening)


async def test_postgres_down_serves_cached_and_refuses_cold_fast(
    dsn: str,
    echo: Echo,
    postgres_server: PostgresServer,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    # A short TTL so that the cached host is past it while Postgres is down: what serves it
    # then is stale-if-error, not freshness.
    proxy = start_proxy(_config(tmp_path, echo, cache_ttl_s=0.2), env={"DATABASE_URL": dsn})
    try:
        assert await _is(http, proxy, "videos.acme.test", 200)
        await postgres_server.astop()
        try:
            await asyncio.sleep(0.3)  # let the cached entry pass its TTL (not synchronisation)
            got = await status_of(http, proxy, "videos.acme.test")
            assert got[0] == 200, got[:2]
            started = time.monotonic()
            got = await status_of(http, proxy, f"cold{free_port()}.flatrender.test")
            assert got[:2] == (503, "tenant_store_unavailable")
            assert time.monotonic() - started < 1.5
            async with http.get(f"http://127.0.0.1:{proxy.admin_port}/readyz") as r:
                assert r.status == 503
        finally:
            await postgres_server.astart()
        await within(5.0, lambda: _is(http, proxy, "acme.flatrender.test", 200))

        async def ready() -> bool:
            async with http.get(f"http://127.0.0.1:{proxy.admin_port}/readyz") as r:
                return r.status == 200

        await within(5.0, ready)  # the LISTEN link is back too
    finally:
        output = proxy.output()
    assert "Traceback" not in output, output


async def test_black_holed_postgres_costs_at_most_the_store_timeout(
    dsn: str,
    echo: Echo,
    postgres_server: PostgresServer,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """A database that accepts connections and never answers (SIGSTOP) must not hold
    requests beyond ``store_timeout_s`` (1 s by default)."""
    proxy = start_proxy(_config(tmp_path, echo), env={"DATABASE_URL": dsn})
    try:
        assert await _is(http, proxy, "videos.acme.test", 200)
        postgres_server.pause()
        try:
            started = time.monotonic()
            got = await status_of(http, proxy, f"hole{free_port()}.flatrender.test")
            elapsed = time.monotonic() - started
            assert got[:2] == (503, "tenant_store_unavailable")
            assert elapsed < 1.5
            assert await _is(http, proxy, "videos.acme.test", 200)  # cached: unaffected
        finally:
            postgres_server.resume()
        await within(5.0, lambda: _is(http, proxy, "acme.flatrender.test", 200))
    finally:
        output = proxy.output()
    assert "Traceback" not in output, output
