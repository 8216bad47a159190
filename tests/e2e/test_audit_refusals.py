"""Complete audit against real Postgres (CONTRACT §9, §5): every request on an audit route that
resolved a tenant is a row, refusals by tenant status and the proxy's own 5xx included; a key
identified is on its row even when refused, and on a platform domain the row is the key's
tenant's; preflights are no rows; tenant_usage_daily agrees with the rows; and every 401 carries
the Bearer challenge."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from proxy.stores.keyadmin import create_key, revoke_key
from tests.e2e.auditing import assert_usage_matches_rows, copies, proxy_config
from tests.e2e.support import seeded_database, within
from tests.procs import Echo, Proxy, start_proxy, stop
from tests.servers import PostgresServer

ORIGIN = "https://app.acme.test"
PAST = datetime(2020, 1, 1, tzinfo=UTC)
TENANTS = {  # slug: (status, trial_ends_at)
    "acme": ("Active", None),
    "other": ("Active", None),
    "frozen": ("Suspended", None),
    "gone": ("Cancelled", None),
    "lapsed": ("Trial", PAST),
}
KEYS = {  # name: (tenant, scope, allowed_ips, expires_at)
    "read": ("acme", "renders:read", None, None),
    "revoked": ("acme", "renders:*", None, None),
    "expired": ("acme", "renders:*", None, PAST),
    "ip": ("acme", "renders:*", ["192.0.2.0/24"], None),
    "other": ("other", "renders:*", None, None),
    "frozen": ("frozen", "renders:*", None, None),
    "gone": ("gone", "renders:*", None, None),
    "lapsed": ("lapsed", "renders:*", None, None),
}


@dataclass
class World:
    dsn: str
    tenants: dict[str, str]  # slug -> id
    keys: dict[str, tuple[str, str]]  # name -> (id, raw key)


@pytest.fixture(scope="module")
def world(postgres_server: PostgresServer) -> World:
    tenants = {slug: str(uuid.uuid4()) for slug in TENANTS}
    keys: dict[str, tuple[str, str]] = {}

    async def seed(conn: asyncpg.Connection) -> None:
        for slug, (status, trial_ends_at) in TENANTS.items():
            await conn.execute(
                "INSERT INTO identity.tenants (id, slug, name, status, trial_ends_at,"
                " allowed_origins) VALUES ($1, $2, $3, $4, $5, $6)",
                tenants[slug],
                slug,
                slug,
                status,
                trial_ends_at,
                [ORIGIN],
            )
        for name, (tenant, scope, ips, expires_at) in KEYS.items():
            new = await create_key(
                conn,
                tenant_slug=tenant,
                name=name,
                environment="live",
                scopes=[scope],
                rpm=1_000_000,
                allowed_ips=ips,
                expires_at=expires_at,
            )
            keys[name] = (str(new.id), new.key)
        await revoke_key(conn, keys["revoked"][0], "leaked")

    dsn = seeded_database(postgres_server, "auditref", seed)
    return World(dsn, tenants, keys)


@pytest.fixture(scope="module")
def proxy(world: World, echo: Echo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    path = proxy_config(tmp_path_factory.mktemp("auditref"), echo)
    p = start_proxy(path, env={"DATABASE_URL": world.dsn})
    yield p
    stop(p.proc)


@pytest_asyncio.fixture
async def db(world: World) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(world.dsn, min_size=0, max_size=2)
    yield pool
    await pool.close()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@dataclass
class Sent:
    request_id: str
    status: int
    code: str | None
    www_authenticate: str | None


async def send(
    http: aiohttp.ClientSession,
    proxy: Proxy,
    host: str,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> Sent:
    rid = str(uuid.uuid4())
    async with http.request(
        method, f"{proxy.url}{path}", headers={"Host": host, "X-Request-Id": rid, **(headers or {})}
    ) as r:
        body = await r.json() if r.content_type == "application/json" else None
        code = body["error"]["code"] if r.status >= 400 and body else None
        return Sent(rid, r.status, code, r.headers.get("WWW-Authenticate"))


async def rows_of(db: asyncpg.Pool, ids: list[str]) -> dict[str, dict[str, object]]:
    rows = await db.fetch(
        "SELECT request_id::text, tenant_id::text, api_key_id::text, status_code, error_message"
        " FROM identity.tenant_api_request_logs WHERE request_id = ANY($1::uuid[])",
        ids,
    )
    return {r["request_id"]: dict(r) for r in rows}


async def test_every_refusal_of_a_resolved_tenant_is_a_row_with_its_key(
    world: World, proxy: Proxy, db: asyncpg.Pool, http: aiohttp.ClientSession
) -> None:
    t, k = world.tenants, world.keys

    def key(name: str) -> dict[str, str]:
        return {"X-API-Key": k[name][1]}

    # (host, method, path, headers) -> (status, code, row's tenant, row's key name or None)
    plan: list[tuple[str, str, str, dict[str, str], int, str | None, str, str | None]] = [
        # Tenant status, without a key and with the tenant's own key (identified: on the row).
        ("frozen.flatrender.test", "GET", "/public/x", {}, 403, "tenant_suspended", "frozen", None),
        ("gone.flatrender.test", "GET", "/public/x", {}, 410, "tenant_cancelled", "gone", None),
        ("lapsed.flatrender.test", "GET", "/public/x", {}, 402, "trial_expired", "lapsed", None),
        ("frozen.flatrender.test", "GET", "/v1/renders/1", key("frozen"), 403,
         "tenant_suspended", "frozen", "frozen"),
        ("gone.flatrender.test", "GET", "/v1/renders/1", key("gone"), 410,
         "tenant_cancelled", "gone", "gone"),
        ("lapsed.flatrender.test", "GET", "/v1/renders/1", key("lapsed"), 402,
         "trial_expired", "lapsed", "lapsed"),
        # Keyed refusals on the tenant's own host: the key's id is on the row.
        ("acme.flatrender.test", "GET", "/v1/renders/1", key("revoked"), 401,
         "api_key_revoked", "acme", "revoked"),
        ("acme.flatrender.test", "GET", "/v1/renders/1", key("expired"), 401,
         "api_key_expired", "acme", "expired"),
        ("acme.flatrender.test", "GET", "/v1/renders/1", key("ip"), 403,
         "ip_not_allowed", "acme", "ip"),
        ("acme.flatrender.test", "POST", "/v1/renders", key("read"), 403,
         "insufficient_scope", "acme", "read"),
        # Another tenant's key: the Host's tenant's row, with that key's id.
        ("acme.flatrender.test", "GET", "/v1/renders/1", key("other"), 403,
         "tenant_mismatch", "acme", "other"),
        # No key identified: no key id.
        ("acme.flatrender.test", "GET", "/v1/renders/1", {"Authorization": "Bearer not-a-key"},
         401, "invalid_api_key", "acme", None),
        ("acme.flatrender.test", "GET", "/v1/renders/1", {}, 401, "missing_api_key", "acme", None),
        # On the platform domain itself, the key's tenant owns the row, refused or not.
        ("flatrender.test", "GET", "/v1/renders/1", key("read"), 200, None, "acme", "read"),
        ("flatrender.test", "GET", "/v1/renders/1", key("revoked"), 401,
         "api_key_revoked", "acme", "revoked"),
        ("flatrender.test", "POST", "/v1/renders", key("read"), 403,
         "insufficient_scope", "acme", "read"),
        ("flatrender.test", "GET", "/v1/renders/1", key("frozen"), 403,
         "tenant_suspended", "frozen", "frozen"),
        ("flatrender.test", "GET", "/v1/renders/1", key("lapsed"), 402,
         "trial_expired", "lapsed", "lapsed"),
        # The proxy's own 5xx.
        ("acme.flatrender.test", "GET", "/v1/dead/x", {}, 502, "upstream_unavailable", "acme",
         None),
        ("frozen.flatrender.test", "GET", "/v1/dead/x", {}, 403, "tenant_suspended", "frozen",
         None),
    ]  # fmt: skip
    sent = [await send(http, proxy, h, p, method=m, headers=hd) for h, m, p, hd, *_ in plan]
    for s, (host, method, path, _, status, code, *_) in zip(sent, plan, strict=True):
        assert (s.status, s.code) == (status, code), (host, method, path)
        if status == 401:  # RFC 6750 §3: every 401 names the scheme
            assert s.www_authenticate is not None
            assert s.www_authenticate == "Bearer"
    ids = [s.request_id for s in sent]
    await within(5.0, lambda: _all_present(db, ids))
    rows = await rows_of(db, ids)
    for s, (*_, status, code, tenant, key_name) in zip(sent, plan, strict=True):
        assert rows[s.request_id] == {
            "request_id": s.request_id,
            "tenant_id": t[tenant],
            "api_key_id": k[key_name][0] if key_name else None,
            "status_code": status,
            "error_message": code,
        }
    assert set((await copies(db, ids)).values()) == {1}

    # tenant_usage_daily agrees with the rows, per tenant, refusals by status included.
    expected: Counter[tuple[str, str]] = Counter()
    for *_, status, _code, tenant, _key in plan:
        expected[(t[tenant], "calls")] += 1
        expected[(t[tenant], f"{status // 100}xx")] += 1
    usage = await db.fetch(
        "SELECT tenant_id::text AS t, sum(api_calls) AS calls, sum(api_4xx) AS c4,"
        " sum(api_5xx) AS c5 FROM identity.tenant_usage_daily"
        " WHERE tenant_id = ANY($1::uuid[]) GROUP BY 1",
        list(t.values()),
    )
    got: Counter[tuple[str, str]] = Counter()
    for u in usage:
        got[(u["t"], "calls")] += u["calls"]
        got[(u["t"], "4xx")] += u["c4"]
        got[(u["t"], "5xx")] += u["c5"]
    assert got == Counter({k_: v for k_, v in expected.items() if k_[1] != "2xx"})
    await assert_usage_matches_rows(db)


async def test_preflights_are_no_rows(
    proxy: Proxy, db: asyncpg.Pool, http: aiohttp.ClientSession
) -> None:
    preflight = {"Access-Control-Request-Method": "POST"}
    allowed = await send(
        http,
        proxy,
        "acme.flatrender.test",
        "/v1/renders",
        method="OPTIONS",
        headers={"Origin": ORIGIN, **preflight},
    )
    refused = await send(
        http,
        proxy,
        "acme.flatrender.test",
        "/v1/renders",
        method="OPTIONS",
        headers={"Origin": "https://evil.test", **preflight},
    )
    assert (allowed.status, refused.status, refused.code) == (204, 403, "origin_not_allowed")
    # A request after them: one process writes its rows in the order they were submitted, so
    # once this one is written, rows of the preflights would have been too.
    after = await send(
        http, proxy, "acme.flatrender.test", "/v1/renders", headers={"Origin": ORIGIN}
    )
    assert after.status == 401
    await within(5.0, lambda: _all_present(db, [after.request_id]))
    assert await rows_of(db, [allowed.request_id, refused.request_id]) == {}


async def test_a_suspended_tenants_unkeyed_and_keyed_refusals_keep_their_answers(
    world: World, proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    """The status still comes first: a suspended tenant is 403 whatever key is sent (an
    unknown one, another tenant's, none), so identifying keys first changed no answer."""
    for headers in (
        {},
        {"X-API-Key": world.keys["other"][1]},
        {"Authorization": "Bearer not-a-key"},
        {"X-API-Key": "fr_live_" + "x" * 40},
    ):
        s = await send(http, proxy, "frozen.flatrender.test", "/v1/renders/1", headers=headers)
        assert (s.status, s.code) == (403, "tenant_suspended"), headers
        assert s.www_authenticate is None


async def _all_present(db: asyncpg.Pool, ids: list[str]) -> bool:
    return len(await copies(db, ids)) == len(ids)
