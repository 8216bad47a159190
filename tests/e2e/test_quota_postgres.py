"""The monthly render quota through real proxy processes on one Postgres and one Redis
(CONTRACT §13): exact admission over ``serve --workers 2`` and a second proxy, what is given
back, unlimited and zero quotas, a flushed Redis, metering, and live quota changes."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from proxy.core.quota import seconds_in_month, seconds_until_next_month
from proxy.migrate import apply_migrations
from proxy.stores.keyadmin import create_key
from tests.e2e.support import within
from tests.procs import Echo, Proxy, free_port, start_proxy, stop, write_config
from tests.servers import PostgresServer, RedisServer

APEX = "flatrender.test"


@pytest.fixture(scope="module")
def dsn(postgres_server: PostgresServer) -> str:
    url = postgres_server.create_database(f"quota_{uuid.uuid4().hex[:10]}")
    asyncio.run(apply_migrations(url))
    return url


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    """The module's own Redis: one test flushes it."""
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


def _config(tmp: Path, echo: Echo) -> Path:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: 502, upstream never reached
    metered = {"auth": "api_key", "audit": True, "meter": "renders"}
    scopes = {"GET": "renders:read", "POST": "renders:create"}
    path = write_config(
        tmp / "edge.toml",
        # Each test creates its tenant and key while the proxies run and uses them at once:
        # names looked up on use, not held from a preload (where a new name is known once its
        # NOTIFY arrives, within the contract's second but not before the first request).
        tenancy={"platform_domains": [APEX], "preload_max_entries": 0},
        upstreams={"render-api": {"urls": [echo.url]}, "dead": {"urls": [dead]}},
        routes=[
            {"prefix": "/v1/renders", "upstream": "render-api", "scopes": scopes, **metered},
            {"prefix": "/v1/dead-renders", "upstream": "dead", **metered},
            {"prefix": "/v1/other", "upstream": "render-api", "auth": "api_key", "audit": True},
        ],
    )
    audit = {"flush_interval_ms": 50, "spool_dir": str(tmp / "spool")}
    lines = [f"{k} = {orjson.dumps(v).decode()}" for k, v in audit.items()]
    path.write_text(path.read_text() + "\n[audit]\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def proxies(
    dsn: str, redis: RedisServer, echo: Echo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Proxy]]:
    """``serve --workers 2`` and a second, single-process proxy, on the same stores."""
    config = _config(tmp_path_factory.mktemp("quota"), echo)
    env = {"DATABASE_URL": dsn, "REDIS_URL": redis.url}
    two = start_proxy(config, env=env, args=("--workers", "2"))
    one = start_proxy(config, env=env)
    yield [two, one]
    stop(one.proc)
    stop(two.proc)


@pytest_asyncio.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(dsn, min_size=0, max_size=2)
    yield pool
    await pool.close()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # One connection per request: the kernel spreads them over both workers (SO_REUSEPORT).
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        yield s


class Tenant:
    def __init__(self, tenant_id: str, slug: str, key: str, key_id: str = "") -> None:
        self.id, self.slug, self.key, self.key_id = tenant_id, slug, key, key_id

    @property
    def host(self) -> str:
        return f"{self.slug}.{APEX}"


async def new_tenant(db: asyncpg.Pool, quota: int | None, rpm: int = 1_000_000) -> Tenant:
    slug = f"q{uuid.uuid4().hex[:10]}"
    tenant_id = await db.fetchval(
        "INSERT INTO identity.tenants (slug, name, status, monthly_render_qty)"
        " VALUES ($1::text, $1::text, 'Active', $2) RETURNING id::text",
        slug,
        quota,
    )
    new = await create_key(
        db,
        tenant_slug=slug,
        name="quota",
        environment="live",
        scopes=["renders:*", "*"],
        rpm=rpm,
        allowed_ips=None,
        expires_at=None,
    )
    return Tenant(tenant_id, slug, new.key, new.id)


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, rid: str) -> None:
        self.status, self.headers, self.body, self.rid = status, headers, body, rid

    @property
    def code(self) -> str | None:
        if self.status < 400:
            return None
        error: str = orjson.loads(self.body)["error"]["code"]
        return error


async def call(
    http: aiohttp.ClientSession,
    proxy: Proxy,
    tenant: Tenant,
    path: str = "/v1/renders",
    method: str = "POST",
) -> Answer:
    rid = str(uuid.uuid4())
    headers = {"Host": tenant.host, "X-API-Key": tenant.key, "X-Request-Id": rid}
    async with http.request(method, proxy.url + path, headers=headers, data=b"{}") as r:
        return Answer(r.status, dict(r.headers), await r.read(), rid)


async def reached_upstream(http: aiohttp.ClientSession, echo: Echo, rids: list[str]) -> int:
    """How many of these requests the upstream received (the echo counts by request id)."""
    seen = 0
    for rid in rids:
        async with http.get(f"{echo.url}/__count/{rid}") as r:
            seen += (await r.json())["count"]
    return seen


async def renders_started(db: asyncpg.Pool, tenant: Tenant) -> int:
    n = await db.fetchval(
        "SELECT coalesce(sum(renders_started), 0) FROM identity.tenant_usage_daily"
        " WHERE tenant_id = $1::uuid",
        tenant.id,
    )
    return int(n)


async def audited(db: asyncpg.Pool, tenant: Tenant) -> int:
    n: int = await db.fetchval(
        "SELECT count(*) FROM identity.tenant_api_request_logs WHERE tenant_id = $1::uuid",
        tenant.id,
    )
    return n


async def settles(get: Callable[[], Awaitable[int]], expected: int) -> None:
    """The audit batch is written off the request path: wait (bounded) for the figure."""

    async def equal() -> bool:
        return await get() == expected

    await within(5, equal)


async def quota_decisions(
    http: aiohttp.ClientSession, proxies: list[Proxy]
) -> Counter[tuple[int, str, str]]:
    """``edge_quota_decisions_total`` by (proxy, worker, decision): a scrape of the
    ``--workers 2`` proxy holds both workers' series."""
    decisions: Counter[tuple[int, str, str]] = Counter()
    for i, proxy in enumerate(proxies):
        async with http.get(f"http://127.0.0.1:{proxy.admin_port}/metrics") as r:
            for family in text_string_to_metric_families(await r.text()):
                if family.name == "edge_quota_decisions":
                    for sample in family.samples:
                        if sample.name.endswith("_total"):
                            labels = sample.labels
                            key = (i, labels.get("worker", ""), labels["decision"])
                            decisions[key] += int(sample.value)
    return decisions


async def test_quota_of_n_admits_exactly_n_of_a_burst_of_3n_over_three_processes(
    http: aiohttp.ClientSession, proxies: list[Proxy], db: asyncpg.Pool, echo: Echo
) -> None:
    n = 20
    tenant = await new_tenant(db, n)
    before = await quota_decisions(http, proxies)
    # The upstream holds each render a moment: admissions overlap with reservations in flight.
    answers = await asyncio.gather(
        *(call(http, proxies[i % 2], tenant, "/v1/renders/slow?seconds=0.2") for i in range(3 * n))
    )
    statuses = Counter(a.status for a in answers)
    assert statuses == {200: n, 429: 2 * n}
    refused = [a for a in answers if a.status == 429]
    assert {a.code for a in refused} == {"render_quota_exceeded"}
    assert await reached_upstream(http, echo, [a.rid for a in refused]) == 0
    assert await reached_upstream(http, echo, [a.rid for a in answers if a.status == 200]) == n
    # Retry-After: to the start of the next UTC month (the clock moved on a little meanwhile).
    expected = seconds_until_next_month(datetime.now(UTC))
    for a in refused:
        assert 0 <= int(a.headers["Retry-After"]) - expected <= 5
        # The key's figures (read, not taken), then the quota's.
        key_item, renders_item = a.headers["RateLimit"].split(", ")
        assert key_item.startswith('"key";r=')
        assert renders_item.startswith('"renders";r=0;t=')
    # Metering agrees: renders_started is exactly the admitted renders, once each.
    await settles(lambda: renders_started(db, tenant), n)
    await settles(lambda: audited(db, tenant), 3 * n)
    # /metrics: the decisions of all three processes add up to the burst.
    made = await quota_decisions(http, proxies) - before
    totals: Counter[str] = Counter()
    for (_, _, decision), count in made.items():
        totals[decision] += count
    assert totals == Counter(admitted=n, refused=2 * n)
    # Every process decided some: both workers of the first proxy, and the second proxy.
    assert len({(proxy, worker) for proxy, worker, _ in made}) == 3


async def test_failed_answers_and_refused_upstreams_give_the_unit_back(
    http: aiohttp.ClientSession, proxies: list[Proxy], db: asyncpg.Pool
) -> None:
    tenant = await new_tenant(db, 3)
    failed = [
        await call(http, proxies[i % 2], tenant, "/v1/renders/status?code=500") for i in range(4)
    ]
    assert {a.status for a in failed} == {500}
    client_errors = [
        await call(http, proxies[i % 2], tenant, "/v1/renders/status?code=422") for i in range(2)
    ]
    assert {a.status for a in client_errors} == {422}
    dead = [await call(http, proxies[i % 2], tenant, "/v1/dead-renders") for i in range(4)]
    assert {a.code for a in dead} == {"upstream_unavailable"}
    ok = [await call(http, proxies[i % 2], tenant) for i in range(3)]
    assert [a.status for a in ok] == [200, 200, 200]
    assert (await call(http, proxies[0], tenant)).code == "render_quota_exceeded"
    await settles(lambda: renders_started(db, tenant), 3)


async def test_a_client_that_leaves_before_the_answer_gives_the_unit_back(
    http: aiohttp.ClientSession, proxies: list[Proxy], db: asyncpg.Pool, echo: Echo
) -> None:
    tenant = await new_tenant(db, 1)
    rid = str(uuid.uuid4())
    _, writer = await asyncio.open_connection("127.0.0.1", proxies[1].port)
    writer.write(
        f"POST /v1/renders/slow?seconds=5 HTTP/1.1\r\nHost: {tenant.host}\r\n"
        f"X-API-Key: {tenant.key}\r\nX-Request-Id: {rid}\r\nContent-Length: 0\r\n\r\n".encode()
    )
    await writer.drain()

    async def upstream_has_it() -> bool:
        return await reached_upstream(http, echo, [rid]) == 1

    await within(5, upstream_has_it)
    # The unit is held while the upstream works on it.
    assert (await call(http, proxies[0], tenant)).code == "render_quota_exceeded"
    writer.close()  # the client leaves before the upstream's answer began
    await writer.wait_closed()

    async def given_back() -> bool:
        return (await call(http, proxies[0], tenant)).status == 200

    assert await within(1.0, given_back) <= 1.0


async def test_other_methods_and_routes_are_neither_counted_nor_refused(
    http: aiohttp.ClientSession, proxies: list[Proxy], db: asyncpg.Pool
) -> None:
    tenant = await new_tenant(db, 0)
    assert (await call(http, proxies[0], tenant, method="GET")).status == 200
    assert (await call(http, proxies[1], tenant, "/v1/other")).status == 200
    plain = await call(http, proxies[1], tenant, "/v1/other")
    assert '"renders"' not in plain.headers.get("RateLimit-Policy", "")
    await settles(lambda: audited(db, tenant), 3)
    assert await renders_started(db, tenant) == 0


async def test_null_is_unlimited_and_zero_allows_none(
    http: aiohttp.ClientSession, proxies: list[Proxy], db: asyncpg.Pool, echo: Echo
) -> None:
    unlimited = await new_tenant(db, None)
    answers = [await call(http, proxies[i % 2], unlimited) for i in range(10)]
    assert {a.status for a in answers} == {200}
    # No quota, no "renders" items: the key's alone.
    assert answers[0].headers["RateLimit-Policy"] == '"key";q=1000000;w=60'
    await settles(lambda: renders_started(db, unlimited), 10)

    none = await new_tenant(db, 0)
    refused = await call(http, proxies[1], none)
    assert refused.code == "render_quota_exceeded"
    assert await reached_upstream(http, echo, [refused.rid]) == 0
    # A negative figure (the column allows one) is no quota at all either, shown as 0.
    negative = await new_tenant(db, -3)
    refused = await call(http, proxies[0], negative)
    assert refused.code == "render_quota_exceeded"
    assert refused.headers["RateLimit-Policy"].endswith(
        f'"renders";q=0;w={seconds_in_month(datetime.now(UTC))}'
    )


async def test_headers_follow_the_keys_and_a_refusal_spends_no_token(
    http: aiohttp.ClientSession, proxies: list[Proxy], db: asyncpg.Pool
) -> None:
    tenant = await new_tenant(db, 2, rpm=3)
    first = await call(http, proxies[1], tenant)
    now = datetime.now(UTC)
    assert first.status == 200
    policy = first.headers["RateLimit-Policy"]
    assert policy == f'"key";q=3;w=60, "renders";q=2;w={seconds_in_month(now)}'
    key_item, renders_item = first.headers["RateLimit"].split(", ")
    assert key_item.startswith('"key";r=2;')
    left, reset = renders_item.removeprefix('"renders";r=').split(";t=")
    assert left == "1"
    assert 0 <= int(reset) - seconds_until_next_month(now) <= 5
    assert (await call(http, proxies[1], tenant)).status == 200  # the quota is used up
    # Five quota refusals: none of them takes a rate-limit token, and each says so in the
    # key's items, which come first as on any keyed answer.
    for _ in range(5):
        refused = await call(http, proxies[1], tenant)
        # Compared with the clock after this answer, not the first's: the whole seconds left
        # (rounded up) drop by one at each second boundary crossed meanwhile.
        after = datetime.now(UTC)
        assert refused.code == "render_quota_exceeded"
        assert refused.headers["X-RateLimit-Remaining"] == "1"
        assert refused.headers["RateLimit-Policy"] == policy
        assert refused.headers["RateLimit"].startswith('"key";r=1;t=')
        assert refused.headers["RateLimit"].split(", ")[1].startswith('"renders";r=0;t=')
        assert 0 <= int(refused.headers["Retry-After"]) - seconds_until_next_month(after) <= 5
    last_token = await call(http, proxies[1], tenant, method="GET")
    assert last_token.status == 200
    assert last_token.headers["X-RateLimit-Remaining"] == "0"
    assert (await call(http, proxies[1], tenant, method="GET")).code == "rate_limited"


async def test_a_rate_limit_refusal_gives_the_unit_back(
    http: aiohttp.ClientSession, proxies: list[Proxy], db: asyncpg.Pool
) -> None:
    tenant = await new_tenant(db, 5, rpm=1)
    assert (await call(http, proxies[1], tenant)).status == 200  # the key's only token
    limited = await call(http, proxies[1], tenant)
    assert limited.code == "rate_limited"
    # Another key of the same tenant: of 5, one render started and this one in flight.
    other = await create_key(
        db,
        tenant_slug=tenant.slug,
        name="second",
        environment="live",
        scopes=["*"],
        rpm=1000,
        allowed_ips=None,
        expires_at=None,
    )
    second = Tenant(tenant.id, tenant.slug, other.key)
    answer = await call(http, proxies[0], second)
    assert answer.status == 200
    assert answer.headers["RateLimit"].split(", ")[1].startswith('"renders";r=3;')


async def test_a_flushed_redis_rebuilds_the_count_from_renders_started(
    http: aiohttp.ClientSession, proxies: list[Proxy], db: asyncpg.Pool, redis: RedisServer
) -> None:
    tenant = await new_tenant(db, 3)
    assert [(await call(http, proxies[i % 2], tenant)).status for i in range(3)] == [200] * 3
    await settles(lambda: renders_started(db, tenant), 3)
    client = aioredis.Redis.from_url(redis.url)
    try:
        assert await client.flushall() is True
    finally:
        await client.aclose()
    for proxy in proxies:
        assert (await call(http, proxy, tenant)).code == "render_quota_exceeded"


async def test_a_quota_change_applies_within_one_second(
    http: aiohttp.ClientSession, proxies: list[Proxy], db: asyncpg.Pool
) -> None:
    tenant = await new_tenant(db, 1)
    assert (await call(http, proxies[0], tenant)).status == 200
    for proxy in proxies:
        assert (await call(http, proxy, tenant)).code == "render_quota_exceeded"
    await db.execute(
        "UPDATE identity.tenants SET monthly_render_qty = 2 WHERE id = $1::uuid", tenant.id
    )

    async def admitted_again() -> bool:
        return (await call(http, proxies[1], tenant)).status == 200

    assert await within(1.0, admitted_again) <= 1.0  # 2 renders started
    # And lowering it refuses at once too: at 4 one more is admitted (3 started); lowered to
    # 3, the next is refused, where 4 would have admitted it. /explain's peek takes no unit,
    # so it can wait for the change without spending the unit the old quota would admit.
    await db.execute(
        "UPDATE identity.tenants SET monthly_render_qty = 4 WHERE id = $1::uuid", tenant.id
    )
    await within(1.0, lambda: quota_seen(http, proxies[1], tenant, 4))
    assert (await call(http, proxies[1], tenant)).status == 200
    await db.execute(
        "UPDATE identity.tenants SET monthly_render_qty = 3 WHERE id = $1::uuid", tenant.id
    )
    assert await within(1.0, lambda: quota_seen(http, proxies[1], tenant, 3)) <= 1.0
    refused = await call(http, proxies[1], tenant)
    assert refused.code == "render_quota_exceeded"
    assert '"renders";q=3;' in refused.headers["RateLimit-Policy"]


async def quota_seen(http: aiohttp.ClientSession, proxy: Proxy, tenant: Tenant, quota: int) -> bool:
    """The quota a metered POST of ``tenant`` would count against now (``/explain``)."""
    params = {
        "host": tenant.host,
        "path": "/v1/renders",
        "method": "POST",
        "key_id": tenant.key_id,
    }
    url = f"http://127.0.0.1:{proxy.admin_port}/explain"
    async with http.get(url, params=params) as r:
        assert r.status == 200, await r.text()
        member = (await r.json())["quota"]
    return member is not None and member["limit"] == quota


async def test_renders_started_equals_the_audited_2xx_posts_on_metered_routes(
    http: aiohttp.ClientSession, proxies: list[Proxy], db: asyncpg.Pool
) -> None:
    """For a tenant with every kind of answer, and for every tenant of the day."""
    tenant = await new_tenant(db, 3)
    paths = ["/v1/renders", "/v1/renders/status?code=500", "/v1/dead-renders", "/v1/renders"]
    paths += ["/v1/renders/status?code=201", "/v1/renders", "/v1/other"]
    answers = [await call(http, proxies[i % 2], tenant, p) for i, p in enumerate(paths)]
    assert [a.status for a in answers] == [200, 500, 502, 200, 201, 429, 200]
    await settles(lambda: renders_started(db, tenant), 3)
    await settles(lambda: audited(db, tenant), len(paths))

    async def agree() -> bool:
        rows = await db.fetch(
            """
            SELECT u.tenant_id, u.renders_started,
                   (SELECT count(*) FROM identity.tenant_api_request_logs l
                     WHERE l.tenant_id = u.tenant_id AND l.method = 'POST'
                       AND l.status_code BETWEEN 200 AND 299
                       AND l.path LIKE '/v1/renders%'
                       AND (l.created_at AT TIME ZONE 'UTC')::date = u.usage_date) AS rows
              FROM identity.tenant_usage_daily u
             WHERE u.usage_date = (now() AT TIME ZONE 'UTC')::date
            """
        )
        return all(r["renders_started"] == r["rows"] for r in rows) and any(
            r["renders_started"] > 0 for r in rows
        )

    await within(5, agree)


async def test_without_redis_a_new_process_rebuilds_the_count_from_postgres(
    http: aiohttp.ClientSession,
    db: asyncpg.Pool,
    dsn: str,
    echo: Echo,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    config = _config(tmp_path_factory.mktemp("quota-in-process"), echo)
    tenant = await new_tenant(db, 2)
    first = await asyncio.to_thread(start_proxy, config, {"DATABASE_URL": dsn})
    try:
        assert [(await call(http, first, tenant)).status for _ in range(3)] == [200, 200, 429]
    finally:
        await asyncio.to_thread(stop, first.proc)  # SIGTERM: the audit queue is written first
    assert await renders_started(db, tenant) == 2
    second = await asyncio.to_thread(start_proxy, config, {"DATABASE_URL": dsn})
    try:
        assert (await call(http, second, tenant)).code == "render_quota_exceeded"
    finally:
        await asyncio.to_thread(stop, second.proc)
