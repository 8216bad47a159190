"""Tenant resolution against hostile tenant rows, a dead database and floods of unknown names
(CONTRACT §3), with real Postgres and real proxy processes.

- Platform names are reserved: rows claiming them change nothing.
- A stopped or black-holed Postgres: cached lookups answer without waiting, only cold ones wait.
- A flood of random Hosts and key prefixes costs Postgres at most the miss budget, counted by
  pg_stat_statements on this module's own database.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import string
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.e2e.support import add_tenant, seeded_database, statement_calls, within
from tests.faults.support import metric
from tests.procs import Echo, Proxy, start_proxy, stop, write_config
from tests.servers import PostgresServer

ACME = "cccccccc-0000-0000-0000-000000000001"
EU = "cccccccc-0000-0000-0000-000000000002"
DEFAULT = "00000000-0000-0000-0000-000000000001"
ALPHABET = string.ascii_letters + string.digits
KEY = "fr_live_" + "".join(secrets.choice(ALPHABET) for _ in range(40))
AUTH = {"Authorization": f"Bearer {KEY}"}
PLATFORM = ["eu.flatrender.test", "flatrender.test"]  # the shorter one last: order must not matter
BY_DOMAIN = "t.custom_domain = $1::citext"
BY_SLUG = "t.slug = $1::citext"
BY_PREFIX = "WHERE key_prefix = $1"


@pytest.fixture(scope="module")
def dsn(postgres_server: PostgresServer) -> str:
    async def seed(conn: asyncpg.Connection) -> None:
        await conn.execute(
            """INSERT INTO identity.tenants (id, slug, name, status, custom_domain,
               domain_verified) VALUES ($1, 'acme', 'Acme', 'Active', 'videos.acme.test', true),
               ($2, 'eu', 'Eu', 'Active', NULL, false)""",
            ACME,
            EU,
        )
        await conn.execute(
            """INSERT INTO identity.tenant_api_keys (tenant_id, name, key_prefix, key_hash,
               last4, scopes) VALUES ($1, 'srv', $2, $3, $4, '{renders:read}')""",
            ACME,
            KEY[:12],
            hashlib.sha256(KEY.encode()).hexdigest(),
            KEY[-4:],
        )

    return seeded_database(postgres_server, "trust", seed)


def _config(tmp: Path, echo: Echo, **tenancy: object) -> Path:
    return write_config(
        tmp / "edge.toml",
        # Names looked up on use (no preload): the miss budget and stale serving tested here.
        tenancy={"platform_domains": PLATFORM, "preload_max_entries": 0, **tenancy},
        upstreams={"render-api": {"urls": [echo.url]}},
        routes=[
            {
                "prefix": "/v1/renders",
                "upstream": "render-api",
                "auth": "api_key",
                "scopes": {"GET": "renders:read"},
            },
            {"prefix": "/public", "upstream": "render-api", "auth": "none"},
        ],
    )


@pytest.fixture(scope="module")
def proxy(dsn: str, echo: Echo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(_config(tmp_path_factory.mktemp("trust"), echo), env={"DATABASE_URL": dsn})
    yield p
    stop(p.proc)


async def get(
    http: aiohttp.ClientSession,
    proxy: Proxy,
    host: str,
    path: str = "/public/x",
    headers: dict[str, str] | None = None,
) -> tuple[int, str | None, str | None]:
    """(status, error code or the tenant id the upstream was told, Retry-After)."""
    async with http.get(f"{proxy.url}{path}", headers={"Host": host, **(headers or {})}) as r:
        body = await r.json()
        if r.status >= 400:
            return r.status, body["error"]["code"], r.headers.get("Retry-After")
        sent = dict(body["headers"])
        return r.status, sent.get("X-FlatRender-Tenant-Id"), None


# --------------------------------------------------------------------------- platform names


async def test_rows_claiming_platform_names_change_nothing(
    proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    """A tenant controls its own row through the back office: writing another's slug host, the
    apex or a nested platform domain into its custom_domain (verified or not) neither takes
    nor blocks that host, gets no challenge answered and no certificate allowed."""
    claims = {
        "acme.flatrender.test": True,  # another tenant's slug host, "verified"
        "flatrender.test": False,  # the apex, unverified: would block it with 421
        "eu.flatrender.test": True,  # a nested platform domain
        "www.acme.flatrender.test": True,  # deeper under the apex
        "nobody.flatrender.test": True,  # a slug host nobody has (yet)
    }
    for i, (domain, verified) in enumerate(claims.items()):
        evil = await add_tenant(
            db, f"evil{i}", status="Active", custom_domain=domain, domain_verified=verified
        )
        await db.execute(
            """INSERT INTO identity.tenant_domain_verifications (tenant_id, domain, method,
               challenge_token, expires_at) VALUES ($1, $2, 'HTTP_FILE', $3,
               now() + interval '1 hour')""",
            evil,
            domain,
            f"tok-evil{i}",
        )
    # The control: the same kind of claim on a name of its own works.
    own = await add_tenant(
        db, "honest", status="Active", custom_domain="videos.honest.test", domain_verified=True
    )
    await db.execute(
        """INSERT INTO identity.tenant_domain_verifications (tenant_id, domain, method,
           challenge_token, expires_at) VALUES ($1, 'videos.honest.test', 'HTTP_FILE',
           'tok-honest', now() + interval '1 hour')""",
        own,
    )

    # Request routing: slug hosts and apexes resolve by rules 2 and 3 only.
    assert await get(http, proxy, "acme.flatrender.test") == (200, ACME, None)
    assert await get(http, proxy, "flatrender.test") == (200, DEFAULT, None)
    # eu.flatrender.test is listed itself: the default tenant, not the slug "eu" (longest match)
    assert await get(http, proxy, "eu.flatrender.test") == (200, DEFAULT, None)
    assert await get(http, proxy, "eu.eu.flatrender.test") == (200, EU, None)
    assert await get(http, proxy, "www.acme.flatrender.test") == (404, "unknown_host", None)
    assert await get(http, proxy, "nobody.flatrender.test") == (404, "unknown_host", None)
    assert await get(http, proxy, "videos.honest.test") == (200, own, None)
    keyed = await get(http, proxy, "acme.flatrender.test", "/v1/renders/1", AUTH)
    assert keyed == (200, ACME, None)

    # Challenges: never answered for a platform name.
    for i, domain in enumerate(claims):
        async with http.get(
            f"{proxy.url}/.well-known/flatrender-challenge/tok-evil{i}", headers={"Host": domain}
        ) as r:
            assert r.status == 404, domain
    async with http.get(
        f"{proxy.url}/.well-known/flatrender-challenge/tok-honest",
        headers={"Host": "videos.honest.test"},
    ) as r:
        assert r.status == 200 and await r.text() == "tok-honest"

    # /tls/allowed: never for a platform name.
    async def ask(domain: str) -> int:
        url = f"http://127.0.0.1:{proxy.admin_port}/tls/allowed"
        async with http.get(url, params={"domain": domain}) as r:
            return r.status

    for domain in claims:
        assert await ask(domain) == 404, domain
        assert await ask(domain.upper() + ".") == 404, domain  # normalised first
    assert await ask("videos.honest.test") == 200


# --------------------------------------------------------------------------- dead database


@pytest.mark.parametrize("outage", ["black-holed", "refusing"])
async def test_dead_postgres_cached_lookups_do_not_wait(
    outage: str,
    dsn: str,
    echo: Echo,
    postgres_server: PostgresServer,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    ttl = 0.5
    proxy = start_proxy(_config(tmp_path, echo, cache_ttl_s=ttl), env={"DATABASE_URL": dsn})
    try:
        # Tenant (by custom domain) and key (by prefix) cached.
        assert (await get(http, proxy, "videos.acme.test", "/v1/renders/1", AUTH))[0] == 200
        if outage == "black-holed":
            postgres_server.pause()
        else:
            await postgres_server.astop()
        try:
            # Let the entries pass their TTL: what answers now is the stale entry, and the
            # refresh it starts cannot finish (time passing, not synchronisation).
            await asyncio.sleep(ttl + 0.1)
            slowest = 0.0
            for _ in range(20):
                started = time.monotonic()
                got = await get(http, proxy, "videos.acme.test", "/v1/renders/1", AUTH)
                slowest = max(slowest, time.monotonic() - started)
                assert got == (200, ACME, None)
            assert slowest < 0.2, slowest
            started = time.monotonic()
            cold = await get(http, proxy, f"cold{uuid.uuid4().hex[:8]}.flatrender.test")
            assert cold[:2] == (503, "tenant_store_unavailable")
            assert time.monotonic() - started < 1.0 + 1.0  # store_timeout_s + 1 s
        finally:
            if outage == "black-holed":
                postgres_server.resume()
            else:
                await postgres_server.astart()
        # Back by itself: a cold host is looked up again.
        await within(10.0, lambda: _status(http, proxy, "acme.flatrender.test", 200))
    finally:
        output = proxy.output()
    assert "Traceback" not in output, output


async def _status(http: aiohttp.ClientSession, proxy: Proxy, host: str, want: int) -> bool:
    return (await get(http, proxy, host))[0] == want


# --------------------------------------------------------------------------- miss budget


@pytest.fixture
def budget_proxy(dsn: str, echo: Echo, tmp_path: Path) -> Iterator[Proxy]:
    p = start_proxy(
        _config(tmp_path, echo, max_miss_lookups_per_s=BUDGET), env={"DATABASE_URL": dsn}
    )
    yield p
    stop(p.proc)


BUDGET = 20


async def _lookups(db: asyncpg.Connection) -> int:
    return sum([await statement_calls(db, s) for s in (BY_DOMAIN, BY_SLUG, BY_PREFIX)])


async def test_a_flood_of_unknown_names_costs_at_most_the_budget(
    budget_proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    proxy = budget_proxy
    known = [
        ("videos.acme.test", "/v1/renders/1", AUTH, ACME),
        ("acme.flatrender.test", "/public/x", {}, ACME),
        ("flatrender.test", "/public/x", {}, DEFAULT),
    ]
    for host, path, headers, tenant in known:  # cached before the flood
        assert await get(http, proxy, host, path, headers) == (200, tenant, None)
    await db.execute("SELECT pg_stat_statements_reset()")

    def random_key() -> dict[str, str]:
        return {"X-API-Key": "fr_live_" + "".join(secrets.choice(ALPHABET) for _ in range(40))}

    flood = (
        [get(http, proxy, f"{uuid.uuid4().hex[:12]}.example") for _ in range(150)]
        + [get(http, proxy, f"{uuid.uuid4().hex[:12]}.flatrender.test") for _ in range(150)]
        + [get(http, proxy, "videos.acme.test", "/v1/renders/1", random_key()) for _ in range(100)]
    )
    started = time.monotonic()
    flooding = asyncio.ensure_future(asyncio.gather(*flood))
    # Known tenants keep answering throughout.
    answered = 0
    while not flooding.done():
        for host, path, headers, tenant in known:
            assert await get(http, proxy, host, path, headers) == (200, tenant, None), host
            answered += 1
    results = await flooding
    elapsed = time.monotonic() - started

    assert {r[:2] for r in results} <= {
        (404, "unknown_host"),
        (401, "invalid_api_key"),
        (503, "tenant_store_unavailable"),
    }
    # Refused by the budget: Retry-After: 1. (A 503 without it is a query that ran out of
    # store_timeout_s on a loaded machine: an outage answer, allowed, and not counted below.)
    by_budget = [r for r in results if r == (503, "tenant_store_unavailable", "1")]
    assert by_budget, "the flood stayed within the budget: nothing was tested"
    assert answered >= len(known)
    # Postgres saw at most the burst plus the rate over the flood's duration...
    queries = await _lookups(db)
    assert queries <= BUDGET + BUDGET * elapsed + 1, (queries, elapsed)
    # ...and every 404/401 was a query that completed.
    assert queries >= sum(1 for r in results if r[0] != 503)
    assert metric(proxy.admin_port, "edge_miss_budget_refusals_total") == len(by_budget)


async def test_existing_tenants_are_never_refused_on_a_cold_cache(
    budget_proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    """Five times the budget of distinct existing tenants at once, on a cold cache: no flood of
    misses, so none is refused (hits give their token back)."""
    slugs = [f"cold{i}-{uuid.uuid4().hex[:6]}" for i in range(BUDGET * 5)]
    await db.execute(
        """INSERT INTO identity.tenants (id, slug, name, status)
           SELECT gen_random_uuid(), s, s, 'Active' FROM unnest($1::text[]) AS s""",
        slugs,
    )
    results = await asyncio.gather(
        *(get(http, budget_proxy, f"{s}.flatrender.test") for s in slugs)
    )
    assert [r[0] for r in results] == [200] * len(slugs)
