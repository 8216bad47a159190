"""Audit rows and metering in Postgres through real proxy processes (CONTRACT §9, issue 6):
the fields of a row, usage that agrees with the rows, a 10 s Postgres outage under load,
SIGKILL while rows are spooled, and SIGTERM with rows pending (Postgres up or down)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
import pytest_asyncio

from proxy.migrate import apply_migrations
from proxy.stores.keyadmin import create_key
from tests.e2e.auditing import assert_usage_matches_rows, copies, proxy_config
from tests.e2e.support import within
from tests.procs import Echo, Proxy, free_port, start_proxy, stop
from tests.servers import PostgresServer

ACME = "dddddddd-0000-0000-0000-000000000001"
HOST = "videos.acme.test"


@pytest.fixture(scope="module")
def dsn(postgres_server: PostgresServer) -> str:
    url = postgres_server.create_database(f"audit_{uuid.uuid4().hex[:10]}")
    asyncio.run(apply_migrations(url))

    async def seed() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                """INSERT INTO identity.tenants (id, slug, name, status, custom_domain,
                   domain_verified) VALUES ($1, 'acme', 'Acme', 'Active', $2, true)""",
                ACME,
                HOST,
            )
        finally:
            await conn.close()

    asyncio.run(seed())
    return url


@pytest.fixture(scope="module")
def proxy(dsn: str, echo: Echo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(proxy_config(tmp_path_factory.mktemp("audit"), echo), env={"DATABASE_URL": dsn})
    yield p
    stop(p.proc)


@pytest_asyncio.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool rather than a connection: it reconnects by itself after the tests that restart
    Postgres (a plain connection would be closed by the restart)."""
    pool = await asyncpg.create_pool(dsn, min_size=0, max_size=2)
    yield pool
    await pool.close()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as s:
        yield s


async def mint(db: asyncpg.Pool, tenant: str = "acme", scopes: str = "renders:*") -> str:
    new = await create_key(
        db,
        tenant_slug=tenant,
        name="audit",
        environment="live",
        scopes=[scopes],
        rpm=1_000_000,
        allowed_ips=None,
        expires_at=None,
    )
    return new.key


async def send(
    http: aiohttp.ClientSession,
    proxy: Proxy,
    path: str,
    *,
    host: str = HOST,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> tuple[str, int]:
    """One request with our own X-Request-Id; returns (request id, status)."""
    rid = str(uuid.uuid4())
    async with http.request(
        method, f"{proxy.url}{path}", headers={"Host": host, "X-Request-Id": rid, **(headers or {})}
    ) as r:
        await r.read()
        assert r.headers["X-Request-Id"] == rid
        return rid, r.status


async def all_present(db: asyncpg.Pool, ids: list[str]) -> bool:
    return len(await copies(db, ids)) == len(ids)


async def test_fields_of_a_row(proxy: Proxy, db: asyncpg.Pool, http: aiohttp.ClientSession) -> None:
    key = await mint(db)
    key_id = str(
        await db.fetchval("SELECT id FROM identity.tenant_api_keys WHERE key_prefix = $1", key[:12])
    )
    before = datetime.now(UTC)
    ok, ok_status = await send(
        http,
        proxy,
        "/v1/renders/42?token=secret",
        headers={
            "Authorization": f"Bearer {key}",
            "User-Agent": "acme-backend/2.0",
            "X-Forwarded-For": "203.0.113.9",
        },
    )
    denied, denied_status = await send(http, proxy, "/v1/renders", method="POST")
    adopted, _ = await send(
        http, proxy, "/v1/renders/1", host="flatrender.test", headers={"X-API-Key": key}
    )
    unaudited, _ = await send(http, proxy, "/v1/optional/x")
    assert (ok_status, denied_status) == (200, 401)
    await within(3.0, lambda: all_present(db, [ok, denied, adopted]))
    after = datetime.now(UTC)
    rows = {
        r["request_id"]: dict(r)
        for r in await db.fetch(
            """SELECT request_id::text, tenant_id::text, api_key_id::text, method, path,
                      status_code, duration_ms, user_id, ip_address::text, user_agent,
                      error_message, created_at
                 FROM identity.tenant_api_request_logs WHERE request_id = ANY($1::uuid[])""",
            [ok, denied, adopted, unaudited],
        )
    }
    assert set(rows) == {ok, denied, adopted}  # /v1/optional is not an audit route
    row = rows[ok]
    assert before <= row.pop("created_at") <= after
    assert row.pop("duration_ms") >= 0
    assert row == {
        "request_id": ok,
        "tenant_id": ACME,
        "api_key_id": key_id,
        "method": "GET",
        "path": "/v1/renders/42",  # never the query string: it may hold secrets
        "status_code": 200,
        "user_id": None,
        "ip_address": "203.0.113.9/32",  # the client, believed from a trusted peer's XFF
        "user_agent": "acme-backend/2.0",
        "error_message": None,
    }
    row = rows[denied]
    assert (row["tenant_id"], row["api_key_id"], row["method"]) == (ACME, None, "POST")
    assert (row["status_code"], row["error_message"]) == (401, "missing_api_key")
    assert row["user_agent"] is not None and row["ip_address"] == "127.0.0.1/32"
    # On a platform domain the key's tenant becomes the request's (CONTRACT §5).
    assert (rows[adopted]["tenant_id"], rows[adopted]["api_key_id"]) == (ACME, key_id)
    key_rows = await db.fetchval(
        "SELECT count(*) FROM identity.tenant_api_request_logs WHERE path LIKE '%secret%'"
    )
    assert key_rows == 0


async def test_usage_daily_equals_the_rows_after_a_mixed_load(
    proxy: Proxy, db: asyncpg.Pool, http: aiohttp.ClientSession
) -> None:
    # Tenants of their own, so that their usage rows hold this test's requests only.
    tenants = {slug: str(uuid.uuid4()) for slug in (f"mix{free_port()}", f"mix{free_port()}")}
    for slug, tid in tenants.items():
        await db.execute(
            "INSERT INTO identity.tenants (id, slug, name, status) VALUES ($1, $2, $3, 'Active')",
            tid,
            slug,
            slug,
        )
    plan: list[tuple[str, str, str, dict[str, str], str]] = []  # slug, method, path, headers, class
    for n, (slug, _) in enumerate(tenants.items()):
        full, read_only = await mint(db, slug), await mint(db, slug, "renders:read")
        plan += [(slug, "GET", "/v1/renders/1", {"X-API-Key": full}, "2xx")] * (40 + 10 * n)
        plan += [(slug, "GET", "/v1/renders/1", {}, "4xx")] * (15 + n)  # missing_api_key
        plan += [(slug, "POST", "/v1/renders", {"X-API-Key": read_only}, "4xx")] * 7  # scope
        plan += [(slug, "GET", "/v1/dead/x", {}, "5xx")] * (12 - n)  # upstream_unavailable
        plan += [(slug, "GET", "/public/x", {}, "2xx")] * 9
    sem = asyncio.Semaphore(20)

    async def one(slug: str, method: str, path: str, headers: dict[str, str]) -> tuple[str, int]:
        async with sem:
            return await send(
                http, proxy, path, host=f"{slug}.flatrender.test", method=method, headers=headers
            )

    sent = await asyncio.gather(*(one(s, m, p, h) for s, m, p, h, _ in plan))
    for (_, status), (*_, cls) in zip(sent, plan, strict=True):
        assert f"{status // 100}xx" == cls
    ids = [rid for rid, _ in sent]
    await within(5.0, lambda: all_present(db, ids))
    assert set((await copies(db, ids)).values()) == {1}
    expected: Counter[tuple[str, str]] = Counter()
    for slug, *_, cls in plan:
        expected[(tenants[slug], "calls")] += 1
        expected[(tenants[slug], cls)] += 1
    usage = await db.fetch(
        "SELECT tenant_id::text AS t, api_calls, api_4xx, api_5xx, usage_date"
        " FROM identity.tenant_usage_daily WHERE tenant_id = ANY($1::uuid[])",
        list(tenants.values()),
    )
    # One UTC day (a run straddling midnight would split it: the sums still hold).
    got: Counter[tuple[str, str]] = Counter()
    for u in usage:
        got[(u["t"], "calls")] += u["api_calls"]
        got[(u["t"], "4xx")] += u["api_4xx"]
        got[(u["t"], "5xx")] += u["api_5xx"]
    assert got == Counter({k: v for k, v in expected.items() if k[1] != "2xx"})
    await assert_usage_matches_rows(db)


async def _stream(
    http: aiohttp.ClientSession, proxy: Proxy, key: str, total: int, rate: float, sent: list[str]
) -> None:
    """``total`` requests at about ``rate`` a second, half keyed, ids appended as answered."""
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with sem:
            path, headers = ("/v1/renders/1", {"X-API-Key": key}) if i % 2 else ("/public/x", {})
            rid, status = await send(http, proxy, path, headers=headers)
            assert status == 200
            sent.append(rid)

    tasks = []
    started = time.monotonic()
    for i in range(total):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(max(0.0, started + (i + 1) / rate - time.monotonic()))  # pacing
    await asyncio.gather(*tasks)


async def test_postgres_down_for_ten_seconds_under_load_loses_and_doubles_nothing(
    dsn: str,
    echo: Echo,
    db: asyncpg.Pool,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    postgres_server: PostgresServer,
) -> None:
    spool = tmp_path / "spool"
    config = proxy_config(tmp_path, echo, batch_max_rows=50, buffer_max_rows=200)
    key = await mint(db)
    proxy = start_proxy(config, env={"DATABASE_URL": dsn})
    sent: list[str] = []
    try:
        warm = [
            (await send(http, proxy, p, headers={"X-API-Key": key}))[0]
            for p in ("/public/x", "/v1/renders/1")
        ]
        stream = asyncio.create_task(_stream(http, proxy, key, 2000, 150.0, sent))
        await within(5.0, lambda: _at_least(sent, 300))
        await postgres_server.astop()
        down_at = time.monotonic()
        try:
            # The buffer passed buffer_max_rows and spilled to the spool: the disk path is used.
            await within(8.0, lambda: _has_files(spool))
            await asyncio.sleep(max(0.0, down_at + 10.0 - time.monotonic()))  # the outage itself
        finally:
            await postgres_server.astart()
        await stream
        ids = sent + warm
        assert len(set(sent)) == 2000
        await within(20.0, lambda: all_present(db, ids))
        await within(5.0, lambda: _no_files(spool))
    finally:
        output = proxy.output()
    counts = await copies(db, ids)
    assert len(counts) == 2002 and set(counts.values()) == {1}
    total = await db.fetchval(
        "SELECT count(*) FROM identity.tenant_api_request_logs WHERE request_id = ANY($1::uuid[])",
        ids,
    )
    assert total == 2002
    await assert_usage_matches_rows(db)
    assert "Traceback" not in output and "AUDIT ROWS DROPPED" not in output, output
    assert "audit rows not written" in output  # it did notice the outage


async def _at_least(items: list[str], n: int) -> bool:
    return len(items) >= n


async def _has_files(directory: Path) -> bool:
    return any(n.endswith(".jsonl") for n in await asyncio.to_thread(_listdir, directory))


async def _no_files(directory: Path) -> bool:
    return not await asyncio.to_thread(_listdir, directory)


def _listdir(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def _spooled_ids(directory: Path) -> list[str]:
    """Request ids in every spool file, whatever its state (ready, being written, claimed)."""
    ids = []
    for name in _listdir(directory):
        try:
            lines = (directory / name).read_bytes().splitlines()
        except FileNotFoundError:  # renamed meanwhile (written, claimed or deleted)
            continue
        ids += [orjson.loads(line)["request_id"] for line in lines]
    return ids


async def test_sigkill_while_rows_are_spooled_then_restart_lands_them_once(
    dsn: str,
    echo: Echo,
    db: asyncpg.Pool,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    postgres_server: PostgresServer,
) -> None:
    spool = tmp_path / "spool"
    config = proxy_config(tmp_path, echo, batch_max_rows=10, buffer_max_rows=20)
    first = start_proxy(config, env={"DATABASE_URL": dsn})
    try:
        warm, _ = await send(http, first, "/public/x")  # the tenant is cached now
        await postgres_server.astop()
        try:
            sent = [warm] + [(await send(http, first, "/public/x"))[0] for _ in range(105)]
            # Everything past the 20 rows the buffer may hold goes to disk, 10 a file.
            await within(5.0, lambda: _spooled_at_least(spool, 80))
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(10)
        finally:
            await postgres_server.astart()
    finally:
        output = first.output()
    spooled = await asyncio.to_thread(_spooled_ids, spool)
    assert len(spooled) >= 80 and set(spooled) <= set(sent)
    second = start_proxy(config, env={"DATABASE_URL": dsn})
    try:
        await within(10.0, lambda: all_present(db, spooled))
        await within(5.0, lambda: _no_files(spool))
    finally:
        output += second.output()
    assert set((await copies(db, sent)).values()) == {1}  # spooled ones once; none twice
    await assert_usage_matches_rows(db)
    assert "Traceback" not in output, output


async def _spooled_at_least(directory: Path, n: int) -> bool:
    return len(await asyncio.to_thread(_spooled_ids, directory)) >= n


async def test_sigterm_writes_pending_rows(
    dsn: str, echo: Echo, db: asyncpg.Pool, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # Neither a full batch nor the interval comes: only the shutdown drain can write them.
    config = proxy_config(tmp_path, echo, flush_interval_ms=3_600_000)
    proxy = start_proxy(config, env={"DATABASE_URL": dsn})
    try:
        ids = [(await send(http, proxy, "/public/x"))[0] for _ in range(50)]
        assert await copies(db, ids) == {}
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(15) == 0
    finally:
        output = proxy.output()
    assert set((await copies(db, ids)).values()) == {1} and len(await copies(db, ids)) == 50
    await assert_usage_matches_rows(db)
    assert "Traceback" not in output, output


async def test_sigterm_with_postgres_down_spools_and_the_next_process_replays(
    dsn: str,
    echo: Echo,
    db: asyncpg.Pool,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    postgres_server: PostgresServer,
) -> None:
    spool = tmp_path / "spool"
    config = proxy_config(tmp_path, echo, flush_interval_ms=3_600_000, drain_timeout_s=1)
    proxy = start_proxy(config, env={"DATABASE_URL": dsn})
    # (The next process replays at start-up, long before its own flush interval.)
    try:
        warm, _ = await send(http, proxy, "/public/x")  # the tenant is cached now
        await postgres_server.astop()
        try:
            ids = [warm] + [(await send(http, proxy, "/public/x"))[0] for _ in range(30)]
            started = time.monotonic()
            proxy.proc.send_signal(signal.SIGTERM)
            assert proxy.proc.wait(15) == 0
            assert time.monotonic() - started < 5.0  # bounded, with Postgres gone
        finally:
            await postgres_server.astart()
    finally:
        output = proxy.output()
    assert set(await asyncio.to_thread(_spooled_ids, spool)) >= set(ids)
    second = start_proxy(config, env={"DATABASE_URL": dsn})
    try:
        await within(10.0, lambda: all_present(db, ids))
    finally:
        output += second.output()
    assert set((await copies(db, ids)).values()) == {1}
    await assert_usage_matches_rows(db)
    assert "Traceback" not in output and "AUDIT ROWS DROPPED" not in output, output
