"""``GET /explain`` (CONTRACT §10) against the real outcome of the same request on the public
listener, row by row, through a real proxy process on real Postgres and Redis; and proof that
explaining takes nothing: no token, no quota unit, no counter, no audit row, no key use, and
no request to the upstream."""

from __future__ import annotations

import asyncio
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from proxy.migrate import apply_migrations
from proxy.stores.keyadmin import create_key
from tests.e2e.support import within
from tests.procs import Proxy, start_proxy, stop, write_config
from tests.servers import PostgresServer, RedisServer

APEX = "flatrender.test"
ORIGIN = "https://app.acme.example"
KEY_CODES = {
    "invalid_api_key",
    "api_key_expired",
    "api_key_revoked",
    "ip_not_allowed",
    "tenant_mismatch",
    "insufficient_scope",
}


class CountingUpstream:
    """Answers 200 with ``X-Stub: 1`` (so a forwarded answer is told from the proxy's own) and
    counts every request it gets."""

    def __init__(self) -> None:
        self.requests = 0
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                upstream.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                self.send_response(200)
                self.send_header("X-Stub", "1")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = do_OPTIONS = _answer

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class World:
    proxy: Proxy
    upstream: CountingUpstream
    dsn: str
    redis_url: str
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (id, raw key)


async def _seed(dsn: str) -> dict[str, tuple[str, str]]:
    db = await asyncpg.connect(dsn)
    try:
        past = datetime.now(UTC) - timedelta(days=1)
        tenants: list[tuple[str, str, dict[str, Any]]] = [
            ("acme", "Active", {"allowed_origins": [ORIGIN]}),
            ("other", "Active", {}),
            ("quota", "Active", {"monthly_render_qty": 1}),
            ("susp", "Suspended", {}),
            ("canc", "Cancelled", {}),
            ("trial", "Trial", {"trial_ends_at": past}),
            ("unver", "Active", {"custom_domain": "unverified.example", "domain_verified": False}),
        ]
        for slug, status, cols in tenants:
            names = ["slug", "name", "status", *cols]
            marks = ", ".join(f"${i + 1}" for i in range(len(names)))
            await db.execute(
                f"INSERT INTO identity.tenants ({', '.join(names)}) VALUES ({marks})",
                slug,
                slug.title(),
                status,
                *cols.values(),
            )
        specs: dict[str, tuple[str, list[str], int, list[str] | None]] = {
            "good": ("acme", ["renders:*"], 1000, None),
            "readonly": ("acme", ["renders:read"], 1000, None),
            "expired": ("acme", ["*"], 1000, None),
            "revoked": ("acme", ["*"], 1000, None),
            "ip": ("acme", ["*"], 1000, ["10.0.0.0/8"]),
            "other": ("other", ["*"], 1000, None),
            "limited": ("acme", ["*"], 1, None),
            "quota": ("quota", ["*"], 1000, None),
        }
        keys = {}
        for name, (slug, scopes, rpm, ips) in specs.items():
            new = await create_key(
                db,
                tenant_slug=slug,
                name=name,
                environment="live",
                scopes=scopes,
                rpm=rpm,
                allowed_ips=ips,
                expires_at=None,
            )
            keys[name] = (new.id, new.key)
        await db.execute(
            "UPDATE identity.tenant_api_keys SET expires_at = $2 WHERE id = $1::uuid",
            keys["expired"][0],
            past,
        )
        await db.execute(
            "UPDATE identity.tenant_api_keys SET revoked_at = now(), is_active = false"
            " WHERE id = $1::uuid",
            keys["revoked"][0],
        )
        return keys
    finally:
        await db.close()


@pytest.fixture(scope="module")
def world(
    postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    dsn = postgres_server.create_database(f"explain_{uuid.uuid4().hex[:10]}")
    asyncio.run(apply_migrations(dsn))
    keys = asyncio.run(_seed(dsn))
    redis = RedisServer()  # the module's own: every key in it is compared
    redis.start()
    upstream = CountingUpstream()
    tmp = tmp_path_factory.mktemp("explain")
    config = write_config(
        tmp / "edge.toml",
        tenancy={"platform_domains": [APEX]},
        upstreams={"render-api": {"urls": [upstream.url]}},
        routes=[
            {
                "prefix": "/v1/renders",
                "upstream": "render-api",
                "auth": "api_key",
                "scopes": {"GET": "renders:read", "POST": "renders:create"},
                "audit": True,
                "meter": "renders",
            },
            {"prefix": "/public", "upstream": "render-api", "auth": "none", "audit": True},
        ],
        sections={
            "audit": {
                "flush_interval_ms": 50,
                "usage_flush_interval_s": 0.05,
                "spool_dir": str(tmp / "spool"),
            }
        },
    )
    proxy = start_proxy(config, env={"DATABASE_URL": dsn, "REDIS_URL": redis.url})
    try:
        yield World(proxy, upstream, dsn, redis.url, keys)
    finally:
        stop(proxy.proc)
        upstream.close()
        redis.cleanup()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@dataclass(frozen=True)
class Row:
    host: str
    path: str
    method: str = "GET"
    key: str | None = None  # a key's name in World.keys, "unknown", or None: no key
    origin: str | None = None
    client_ip: str | None = None  # explained as this address; sent as X-Forwarded-For
    prime: int = 0  # real requests made first (to empty a bucket or use up a quota)


def slug(name: str) -> str:
    return f"{name}.{APEX}"


ROWS = {
    "unknown host": Row("nobody.example", "/public"),
    "unverified domain": Row("unverified.example", "/public"),
    "suspended": Row(slug("susp"), "/public"),
    "cancelled": Row(slug("canc"), "/public"),
    "expired trial": Row(slug("trial"), "/public"),
    "no route": Row(slug("acme"), "/nowhere"),
    "missing key": Row(slug("acme"), "/v1/renders"),
    "unknown key": Row(slug("acme"), "/v1/renders", key="unknown"),
    "expired key": Row(slug("acme"), "/v1/renders", key="expired"),
    "revoked key": Row(slug("acme"), "/v1/renders", key="revoked"),
    "ip not allowed": Row(slug("acme"), "/v1/renders", key="ip"),
    "ip allowed (client_ip)": Row(slug("acme"), "/v1/renders", key="ip", client_ip="10.1.2.3"),
    "tenant mismatch": Row(slug("acme"), "/v1/renders", key="other"),
    "insufficient scope": Row(slug("acme"), "/v1/renders", method="POST", key="readonly"),
    "over limit": Row(slug("acme"), "/v1/renders", key="limited", prime=1),
    "over quota": Row(slug("quota"), "/v1/renders", method="POST", key="quota", prime=1),
    "allowed": Row(slug("acme"), "/v1/renders", key="good"),
    "allowed on the apex (key's tenant)": Row(APEX, "/v1/renders/7", key="good"),
    "suspended, public route, dot-segments": Row(slug("susp"), "/x/../public"),
    "preflight allowed": Row(slug("acme"), "/v1/renders", method="OPTIONS", origin=ORIGIN),
    "preflight refused": Row(
        slug("acme"), "/v1/renders", method="OPTIONS", origin="https://evil.example"
    ),
    "actual request, origin not allowed": Row(
        slug("acme"), "/v1/renders", key="good", origin="https://evil.example"
    ),
}


def explain_params(world: World, row: Row) -> dict[str, str]:
    params = {"host": row.host, "path": row.path, "method": row.method}
    if row.key == "unknown":
        params["key_id"] = str(uuid.uuid4())
    elif row.key is not None:
        params["key_id"] = world.keys[row.key][0]
    if row.origin is not None:
        params["origin"] = row.origin
    if row.client_ip is not None:
        params["client_ip"] = row.client_ip
    return params


async def explain(http: aiohttp.ClientSession, proxy: Proxy, params: dict[str, str]) -> Any:
    url = f"http://127.0.0.1:{proxy.admin_port}/explain"
    async with http.get(url, params=params) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def real(
    http: aiohttp.ClientSession, world: World, row: Row
) -> tuple[int | None, str | None]:
    """The public listener's answer: (None, None) when the upstream answered."""
    headers = {"Host": row.host}
    if row.key == "unknown":
        headers["X-API-Key"] = "fr_live_" + secrets.token_hex(20)
    elif row.key is not None:
        headers["X-API-Key"] = world.keys[row.key][1]
    if row.origin is not None:
        headers["Origin"] = row.origin
        if row.method == "OPTIONS":
            headers["Access-Control-Request-Method"] = "GET"
    if row.client_ip is not None:
        headers["X-Forwarded-For"] = row.client_ip
    async with http.request(
        row.method, world.proxy.url + row.path, headers=headers, data=b"{}"
    ) as r:
        body = await r.read()
        if r.headers.get("X-Stub") == "1":
            return None, None
        code = orjson.loads(body)["error"]["code"] if r.status >= 400 else None
        return r.status, code


@pytest.mark.parametrize("name", list(ROWS))
async def test_explain_answers_what_the_public_listener_does(
    world: World, http: aiohttp.ClientSession, name: str
) -> None:
    row = ROWS[name]
    for _ in range(row.prime):
        assert await real(http, world, row) == (None, None)  # served, and counted
    explained = await explain(http, world.proxy, explain_params(world, row))
    outcome = await real(http, world, row)
    assert (explained["answer"]["status"], explained["answer"]["code"]) == outcome
    if row.key is not None and explained["key"] is not None:
        _, code = outcome
        assert explained["key"]["verdict"] == (code if code in KEY_CODES else "ok")
    if outcome[0] in (404, 421) and outcome[1] != "no_route":
        assert explained["tenant"] is None


async def test_the_members_of_an_allowed_request(world: World, http: aiohttp.ClientSession) -> None:
    got = await explain(
        http, world.proxy, {"host": APEX, "path": "/v1/renders", "key_id": world.keys["good"][0]}
    )
    assert got["answer"] == {"status": None, "code": None}
    assert got["tenant"]["slug"] == "acme" and got["tenant"]["rule"] == "platform"
    assert got["route"] == {"prefix": "/v1/renders", "upstream": "render-api", "auth": "api_key"}
    assert got["key"] == {"id": world.keys["good"][0], "verdict": "ok"}
    assert got["limit"]["limit"] == 1000 and got["cors"] is None
    assert got["quota"] is None  # a GET is not metered
    quota = await explain(
        http,
        world.proxy,
        {
            "host": slug("quota"),
            "path": "/v1/renders",
            "method": "POST",
            "key_id": world.keys["quota"][0],
        },
    )
    assert quota["tenant"]["rule"] == "slug"
    assert quota["quota"]["limit"] == 1 and quota["quota"]["reset"] >= 1


@pytest.mark.parametrize(
    "params",
    [
        {"path": "/v1/renders"},
        {"host": slug("acme")},
        {"host": "bad host!", "path": "/"},
        {"host": slug("acme"), "path": "no-slash"},
        {"host": slug("acme"), "path": "/../etc"},
        {"host": slug("acme"), "path": "/v1/renders", "key_id": "fr_live_notanid"},
        {"host": slug("acme"), "path": "/v1/renders", "client_ip": "nowhere"},
    ],
)
async def test_bad_queries_are_400_bad_request(
    world: World, http: aiohttp.ClientSession, params: dict[str, str]
) -> None:
    url = f"http://127.0.0.1:{world.proxy.admin_port}/explain"
    async with http.get(url, params=params) as r:
        assert r.status == 400
        assert r.headers["Content-Type"].startswith("application/json")
        assert (await r.json())["error"]["code"] == "bad_request"


async def _redis_contents(url: str) -> dict[bytes, tuple[object, int]]:
    client = aioredis.Redis.from_url(url)
    try:
        out: dict[bytes, tuple[object, int]] = {}
        for key in await client.keys("*"):
            kind = await client.type(key)
            if kind == b"zset":
                value: object = await client.zrange(key, 0, -1, withscores=True)
            else:
                value = await client.get(key)
            out[key] = (value, await client.pttl(key))
        return out
    finally:
        await client.aclose()


COUNTERS = (
    "edge_requests",
    "edge_limiter_decisions",
    "edge_quota_decisions",
    "edge_quota_settlements",
    "edge_quota_rebuilds",
)  # audit rows are counted in the table itself: the flusher's counter trails its commit


async def _counters(http: aiohttp.ClientSession, proxy: Proxy) -> dict[tuple[str, str], float]:
    async with http.get(f"http://127.0.0.1:{proxy.admin_port}/metrics") as r:
        text = await r.text()
    return {
        (s.name, repr(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.name in COUNTERS
        for s in family.samples
    }


TABLES = {
    "audit rows": "SELECT count(*) FROM identity.tenant_api_request_logs",
    "daily calls": "SELECT coalesce(sum(api_calls), 0) FROM identity.tenant_usage_daily",
    "renders started": "SELECT coalesce(sum(renders_started), 0) FROM identity.tenant_usage_daily",
    "key uses": "SELECT coalesce(sum(usage_count), 0) FROM identity.tenant_api_keys",
}


async def _tables(db: asyncpg.Connection) -> dict[str, int]:
    return {name: int(await db.fetchval(sql)) for name, sql in TABLES.items()}


async def _settled(
    http: aiohttp.ClientSession, world: World, db: asyncpg.Connection
) -> dict[str, int]:
    """One real request, then the tables once its audit row and its key use are written: every
    row and use queued before it is written by then (both are flushed in order)."""
    rid = str(uuid.uuid4())
    key_id, key = world.keys["good"]
    uses = await db.fetchval(
        "SELECT usage_count FROM identity.tenant_api_keys WHERE id = $1::uuid", key_id
    )
    headers = {"Host": slug("acme"), "X-API-Key": key, "X-Request-Id": rid}
    async with http.get(world.proxy.url + "/v1/renders", headers=headers) as r:
        assert r.status == 200

    async def written() -> bool:
        row = await db.fetchval(
            "SELECT count(*) FROM identity.tenant_api_request_logs WHERE request_id = $1::uuid",
            rid,
        )
        used = await db.fetchval(
            "SELECT usage_count FROM identity.tenant_api_keys WHERE id = $1::uuid", key_id
        )
        return bool(row) and used > uses

    await within(10, written)
    return await _tables(db)


async def test_explaining_takes_and_writes_nothing(
    world: World, http: aiohttp.ClientSession
) -> None:
    db = await asyncpg.connect(world.dsn)
    try:
        await real(http, world, ROWS["over quota"])  # a quota count in Redis, whatever its answer
        before_tables = await _settled(http, world, db)
        before_redis = await _redis_contents(world.redis_url)
        before_counters = await _counters(http, world.proxy)
        before_upstream = world.upstream.requests
        assert any(k.startswith(b"edge:rl:") for k in before_redis)  # there are buckets to keep
        assert any(k.startswith(b"edge:quota:") for k in before_redis)

        for row in ROWS.values():
            for _ in range(2):
                await explain(http, world.proxy, explain_params(world, row))

        after_redis = await _redis_contents(world.redis_url)
        assert after_redis.keys() == before_redis.keys()
        for key, (value, pttl) in after_redis.items():
            assert value == before_redis[key][0], key
            assert pttl <= before_redis[key][1], key  # no expiry pushed back by a write
        assert await _counters(http, world.proxy) == before_counters
        assert world.upstream.requests == before_upstream
        after_tables = await _settled(http, world, db)  # the barrier request itself: one more
        assert after_tables == {
            **before_tables,
            "audit rows": before_tables["audit rows"] + 1,
            "daily calls": before_tables["daily calls"] + 1,
            "key uses": before_tables["key uses"] + 1,
        }
    finally:
        await db.close()
