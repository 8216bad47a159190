"""API keys from real Postgres through a real proxy process (CONTRACT §1 keys, §5)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import string
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from proxy.stores.keyadmin import create_key
from tests.e2e.support import seeded_database, statement_calls, within
from tests.procs import (
    ROOT,
    Echo,
    Proxy,
    raw_request,
    start_echo,
    start_proxy,
    stop,
    write_config,
)
from tests.servers import PostgresServer

ACME = "cccccccc-0000-0000-0000-000000000001"
GLOBEX = "cccccccc-0000-0000-0000-000000000002"
HOST = "videos.acme.test"


@pytest.fixture(scope="module")
def dsn(postgres_server: PostgresServer) -> str:
    async def seed(conn: asyncpg.Connection) -> None:
        await conn.execute(
            """INSERT INTO identity.tenants (id, slug, name, status, custom_domain,
               domain_verified) VALUES ($1, 'acme', 'Acme', 'Active', $3, true),
               ($2, 'globex', 'Globex', 'Active', NULL, false)""",
            ACME,
            GLOBEX,
            HOST,
        )

    return seeded_database(postgres_server, "keys", seed)


@pytest.fixture(scope="module")
def staging() -> Iterator[Echo]:
    e = start_echo()
    yield e
    stop(e.proc)


def _config(tmp: Path, echo: Echo, staging: Echo, flush_ms: int = 100) -> Path:
    path = write_config(
        tmp / "edge.toml",
        server={"trusted_proxies": ["127.0.0.1/32"]},
        # Names looked up on use (no preload): the per-prefix queries tested here.
        tenancy={"platform_domains": ["flatrender.test"], "preload_max_entries": 0},
        upstreams={"render-api": {"urls": [echo.url]}, "staging": {"urls": [staging.url]}},
        routes=[
            {
                "prefix": "/v1/renders",
                "upstream": "render-api",
                "test_upstream": "staging",
                "auth": "api_key",
                "scopes": {"GET": "renders:read", "POST": "renders:create"},
            },
            {
                "prefix": "/v1/admin",
                "upstream": "render-api",
                "auth": "api_key",
                "scopes": {"GET": "admin:read"},
            },
            {"prefix": "/v1/optional", "upstream": "render-api", "auth": "optional"},
        ],
    )
    # Key usage is flushed on the audit's short interval here, not the production 10 s, so that
    # the batching test sees several flushes within its deadline.
    path.write_text(
        path.read_text()
        + f"\n[audit]\nflush_interval_ms = {flush_ms}\nusage_flush_interval_s = {flush_ms / 1000}\n"
    )
    return path


@pytest.fixture(scope="module")
def proxy(
    dsn: str, echo: Echo, staging: Echo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    p = start_proxy(
        _config(tmp_path_factory.mktemp("keys"), echo, staging), env={"DATABASE_URL": dsn}
    )
    yield p
    stop(p.proc)


async def mint(db: asyncpg.Connection, tenant: str = "acme", **kw: object) -> tuple[str, str]:
    args: dict[str, object] = {
        "tenant_slug": tenant,
        "name": "srv",
        "environment": "live",
        "scopes": ["renders:*"],
        "rpm": 100_000,
        "allowed_ips": None,
        "expires_at": None,
    }
    args.update(kw)
    new = await create_key(db, **args)  # type: ignore[arg-type]
    return new.id, new.key


async def call(
    http: aiohttp.ClientSession,
    proxy: Proxy,
    path: str,
    headers: dict[str, str],
    host: str = HOST,
) -> tuple[int, str | None, dict[str, object]]:
    async with http.get(f"{proxy.url}{path}", headers={"Host": host, **headers}) as r:
        body = await r.json()
        if r.status >= 400:
            return r.status, body["error"]["code"], body
        return r.status, None, body


def _headers(echoed: dict[str, object], name: str) -> list[str]:
    return [v for k, v in echoed["headers"] if k.lower() == name.lower()]  # type: ignore[attr-defined]


async def test_every_outcome_of_contract_section_5(
    proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    _, good = await mint(db, scopes=["renders:*"])
    _, narrow = await mint(db, scopes=["renders:read"])
    _, star = await mint(db, scopes=["*"])
    _, expired = await mint(db)
    await db.execute(
        "UPDATE identity.tenant_api_keys SET expires_at = now() - interval '1 s'"
        " WHERE key_prefix = $1",
        expired[:12],
    )
    revoked_id, revoked = await mint(db)
    await db.execute(
        "UPDATE identity.tenant_api_keys SET revoked_at = now() WHERE id = $1", revoked_id
    )
    inactive_id, inactive = await mint(db)
    await db.execute(
        "UPDATE identity.tenant_api_keys SET is_active = false WHERE id = $1", inactive_id
    )
    _, other = await mint(db, tenant="globex")
    _, v4 = await mint(db, allowed_ips=["203.0.113.0/24"])
    _, v6 = await mint(db, allowed_ips=["2001:db8::/32"])
    wrong_secret = good[:12] + ("A" if good[12] != "A" else "B") + good[13:]
    unknown = "fr_live_" + "".join(random.choices(string.ascii_letters, k=40))
    xff = "X-Forwarded-For"
    cases: list[tuple[dict[str, str], str, int, str | None]] = [
        ({}, "/v1/renders", 401, "missing_api_key"),
        ({"X-API-Key": "fr_live_short"}, "/v1/renders", 401, "invalid_api_key"),
        ({"X-API-Key": unknown}, "/v1/renders", 401, "invalid_api_key"),
        ({"X-API-Key": wrong_secret}, "/v1/renders", 401, "invalid_api_key"),
        ({"X-API-Key": expired}, "/v1/renders", 401, "api_key_expired"),
        ({"X-API-Key": revoked}, "/v1/renders", 401, "api_key_revoked"),
        ({"X-API-Key": inactive}, "/v1/renders", 401, "api_key_revoked"),
        ({"X-API-Key": other}, "/v1/renders", 403, "tenant_mismatch"),
        ({"Authorization": f"Bearer {good}"}, "/v1/renders/1", 200, None),
        ({"Authorization": f"Bearer {narrow}"}, "/v1/renders/1", 200, None),
        ({"Authorization": f"Bearer {narrow}"}, "/v1/admin/x", 403, "insufficient_scope"),
        ({"Authorization": f"Bearer {good}"}, "/v1/admin/x", 403, "insufficient_scope"),
        ({"Authorization": f"Bearer {star}"}, "/v1/admin/x", 200, None),
        # Client address from a trusted peer's X-Forwarded-For (127.0.0.1 is trusted here).
        ({"X-API-Key": v4, xff: "203.0.113.7"}, "/v1/renders", 200, None),
        ({"X-API-Key": v4, xff: "198.51.100.7"}, "/v1/renders", 403, "ip_not_allowed"),
        ({"X-API-Key": v4}, "/v1/renders", 403, "ip_not_allowed"),  # the peer itself
        ({"X-API-Key": v6, xff: "2001:db8::42"}, "/v1/renders", 200, None),
        ({"X-API-Key": v6, xff: "2001:db9::42"}, "/v1/renders", 403, "ip_not_allowed"),
        # A spoofed entry left of an untrusted hop is not believed.
        ({"X-API-Key": v4, xff: "203.0.113.7, 198.51.100.9"}, "/v1/renders", 403, "ip_not_allowed"),
    ]
    for headers, path, status, code in cases:
        got = await call(http, proxy, path, headers)
        assert got[:2] == (status, code), (headers, path)
    # From an untrusted peer (127.0.0.2) the claimed X-Forwarded-For is discarded.
    lines = [
        "GET /v1/renders HTTP/1.1",
        f"Host: {HOST}",
        f"X-API-Key: {v4}",
        "X-Forwarded-For: 203.0.113.7",
        "Connection: close",
        "",
        "",
    ]
    untrusted = raw_request(proxy.port, "\r\n".join(lines).encode(), source="127.0.0.2")
    assert untrusted.status == 403 and b"ip_not_allowed" in untrusted.body
    # Unknown and wrong keys are indistinguishable: same status, code and message.
    a = await call(http, proxy, "/v1/renders", {"X-API-Key": unknown})
    b = await call(http, proxy, "/v1/renders", {"X-API-Key": wrong_secret})
    assert a[2]["error"]["message"] == b[2]["error"]["message"]  # type: ignore[index]


async def test_platform_domain_adopts_the_keys_tenant_and_test_keys_route_apart(
    proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession, staging: Echo
) -> None:
    kid, key = await mint(db)
    status, _, echoed = await call(
        http, proxy, "/v1/renders/1", {"X-API-Key": key}, host="flatrender.test"
    )
    assert status == 200
    assert _headers(echoed, "X-FlatRender-Tenant-Id") == [ACME]
    assert _headers(echoed, "X-FlatRender-Api-Key-Id") == [kid]
    assert _headers(echoed, "X-FlatRender-Scopes") == ["renders:*"]
    _, test_key = await mint(db, environment="test")
    status, _, echoed = await call(http, proxy, "/v1/renders/1", {"X-API-Key": test_key})
    assert status == 200
    assert _headers(echoed, "X-FlatRender-Key-Environment") == ["test"]
    assert _headers(echoed, "Host") == [f"127.0.0.1:{staging.port}"]  # the test upstream


def cli(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DATABASE_URL": dsn},
    )


async def test_cli_create_and_revoke_on_a_running_proxy(
    proxy: Proxy, dsn: str, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    made = cli(
        "keys",
        "create",
        "--tenant",
        "acme",
        "--name",
        "cli",
        "--scope",
        "renders:read",
        "--rpm",
        "120",
        "--allow-ip",
        "127.0.0.1/32",
        "--expires",
        "2999-01-01T00:00:00Z",
        dsn=dsn,
    )
    assert made.returncode == 0, made.stderr
    new = json.loads(made.stdout)
    assert set(new) == {"id", "key", "key_prefix", "last4"}
    key = new["key"]
    assert key.startswith("fr_live_") and len(key) >= 8 + 32
    row = await db.fetchrow("SELECT * FROM identity.tenant_api_keys WHERE id = $1::uuid", new["id"])
    assert row["key_prefix"] == key[:12] == new["key_prefix"] and row["last4"] == key[-4:]
    assert row["rate_limit_rpm"] == 120 and row["scopes"] == ["renders:read"]
    assert key not in json.dumps({k: str(v) for k, v in dict(row).items()})
    assert (await call(http, proxy, "/v1/renders/1", {"X-API-Key": key}))[0] == 200

    revoked = cli("keys", "revoke", new["id"], "--reason", "leaked", dsn=dsn)
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()
    await asyncio.sleep(1.0)  # the contract's bound: the next request after 1 s is refused
    got = await call(http, proxy, "/v1/renders/1", {"X-API-Key": key})
    assert got[:2] == (401, "api_key_revoked") and time.monotonic() - started < 1.5
    row = await db.fetchrow("SELECT * FROM identity.tenant_api_keys WHERE id = $1::uuid", new["id"])
    assert row["revoked_reason"] == "leaked" and not row["is_active"] and row["revoked_at"]

    test_key = json.loads(
        cli("keys", "create", "--tenant", "acme", "--name", "t", "--test", dsn=dsn).stdout
    )["key"]
    assert test_key.startswith("fr_test_")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--tenant", "nobody", "--name", "x"), "--tenant"),
        (("--tenant", "acme", "--name", "x", "--scope", "Renders Read"), "--scope"),
        (("--tenant", "acme", "--name", "x", "--rpm", "0"), "--rpm"),
        (("--tenant", "acme", "--name", "x", "--allow-ip", "10.0.0.0/33"), "--allow-ip"),
        (("--tenant", "acme", "--name", "x", "--expires", "2020-01-01T00:00:00Z"), "--expires"),
        (("--tenant", "acme", "--name", "x", "--expires", "2999-01-01T00:00:00"), "--expires"),
    ],
)
async def test_cli_refuses_bad_input_and_writes_nothing(
    dsn: str, db: asyncpg.Connection, args: tuple[str, ...], needle: str
) -> None:
    before = await db.fetchval("SELECT count(*) FROM identity.tenant_api_keys")
    result = cli("keys", "create", *args, dsn=dsn)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr
    assert await db.fetchval("SELECT count(*) FROM identity.tenant_api_keys") == before


async def test_cli_revoke_unknown_and_malformed_ids(dsn: str) -> None:
    for key_id, needle in ((str(uuid.uuid4()), "no key"), ("not-a-uuid", "KEY_ID")):
        result = cli("keys", "revoke", key_id, dsn=dsn)
        assert result.returncode != 0 and needle in result.stderr
        assert "Traceback" not in result.stderr


async def test_ten_thousand_unknown_keys_cost_one_query_per_prefix(
    proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits
    prefixes = ["fr_live_" + "".join(rng.choices(alphabet, k=4)) for _ in range(40)]
    keys = [p + "".join(rng.choices(alphabet, k=36)) for p in rng.choices(prefixes, k=10_000)]
    await db.execute("SELECT pg_stat_statements_reset()")
    sem = asyncio.Semaphore(100)

    async def one(key: str) -> int:
        async with (
            sem,
            http.get(f"{proxy.url}/v1/renders", headers={"Host": HOST, "X-API-Key": key}) as r,
        ):
            await r.read()
            return r.status

    statuses = await asyncio.gather(*(one(k) for k in keys))
    assert set(statuses) == {401}
    distinct = len({k[:12] for k in keys})
    assert 0 < await statement_calls(db, "WHERE key_prefix = $1") <= distinct


async def test_usage_is_batched_and_does_not_evict_the_cache(
    proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    kid, key = await mint(db)
    warm_calls = 0

    async def warm() -> bool:
        nonlocal warm_calls
        warm_calls += 1
        # The NOTIFY of the insert may arrive after the first lookup and evict what it loaded:
        # warm until a request needs no lookup by prefix.
        await db.execute("SELECT pg_stat_statements_reset()")
        assert (await call(http, proxy, "/v1/renders/1", {"X-API-Key": key}))[0] == 200
        return await statement_calls(db, "WHERE key_prefix = $1") == 0

    await within(2.0, warm)
    await db.execute("SELECT pg_stat_statements_reset()")
    for _ in range(30):
        got = await call(
            http, proxy, "/v1/renders/1", {"X-API-Key": key, "X-Forwarded-For": "203.0.113.50"}
        )
        assert got[0] == 200
        await asyncio.sleep(0.01)  # spread the requests over several 100 ms flushes

    async def counted() -> bool:
        used = await db.fetchval(
            "SELECT usage_count FROM identity.tenant_api_keys WHERE id = $1", kid
        )
        return bool(used == 30 + warm_calls)

    await within(2.0, counted)
    row = await db.fetchrow("SELECT * FROM identity.tenant_api_keys WHERE id = $1", kid)
    assert str(row["last_used_ip"]) == "203.0.113.50" and row["last_used_at"] is not None
    writes = await statement_calls(db, "UPDATE identity.tenant_api_keys k")
    assert 1 <= writes < 31  # batched: fewer statements than requests
    # The usage writes did not evict the key: no lookup by prefix was needed again.
    assert await statement_calls(db, "WHERE key_prefix = $1") == 0


async def test_sigterm_writes_pending_usage(
    dsn: str,
    echo: Echo,
    staging: Echo,
    db: asyncpg.Connection,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    kid, key = await mint(db)
    proxy = start_proxy(
        _config(tmp_path, echo, staging, flush_ms=3_600_000), env={"DATABASE_URL": dsn}
    )
    try:
        for _ in range(5):
            assert (await call(http, proxy, "/v1/renders/1", {"X-API-Key": key}))[0] == 200
        assert (
            await db.fetchval("SELECT usage_count FROM identity.tenant_api_keys WHERE id = $1", kid)
            == 0
        )
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(15) == 0
    finally:
        output = proxy.output()
    assert (
        await db.fetchval("SELECT usage_count FROM identity.tenant_api_keys WHERE id = $1", kid)
        == 5
    )
    assert key not in output and "Traceback" not in output


async def test_the_raw_key_leaks_nowhere(
    dsn: str,
    echo: Echo,
    staging: Echo,
    db: asyncpg.Connection,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """Upstream-received headers, the database and the proxy's own log output.
    (Audit rows: the embedded JSON-lines file is checked in test_embedded.py.)"""
    proxy = start_proxy(_config(tmp_path, echo, staging), env={"DATABASE_URL": dsn})
    try:
        await _exercise_key(proxy, db, http)
    finally:
        output = proxy.output()
    assert "fr_live_" not in output and "Traceback" not in output


async def _exercise_key(proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession) -> None:
    kid, key = await mint(db)
    seen: list[str] = []
    for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
        status, _, echoed = await call(http, proxy, "/v1/renders/1", headers)
        assert status == 200
        seen.append(json.dumps(echoed))
    # A key on an optional route is verified and removed too; a bearer token that is not a
    # key, sent next to the key, is the upstream's and passes.
    status, _, echoed = await call(
        http, proxy, "/v1/optional/x", {"Authorization": f"Bearer {key}"}
    )
    seen.append(json.dumps(echoed))
    status, _, echoed = await call(
        http,
        proxy,
        "/v1/optional/x",
        {"Authorization": "Bearer studio-session-token", "X-API-Key": key},
    )
    assert _headers(echoed, "Authorization") == ["Bearer studio-session-token"]
    assert all(key not in s and key[12:] not in s for s in seen)
    rows = await db.fetch("SELECT row_to_json(k)::text AS j FROM identity.tenant_api_keys k")
    assert all(key not in r["j"] and key[12:] not in r["j"] for r in rows)
    assert kid in "".join(seen)


async def test_cached_keys_keep_working_while_postgres_is_down(
    dsn: str,
    echo: Echo,
    staging: Echo,
    db: asyncpg.Connection,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    postgres_server: PostgresServer,
) -> None:
    _, key = await mint(db)
    _, cold = await mint(db)
    config = _config(tmp_path, echo, staging)
    config.write_text(config.read_text().replace("[tenancy]", "[tenancy]\ncache_ttl_s = 0.2", 1))
    proxy = start_proxy(config, env={"DATABASE_URL": dsn})
    try:
        assert (await call(http, proxy, "/v1/renders/1", {"X-API-Key": key}))[0] == 200
        await postgres_server.astop()
        try:
            await asyncio.sleep(0.3)  # past the cache TTL: stale-if-error is what serves now
            assert (await call(http, proxy, "/v1/renders/1", {"X-API-Key": key}))[0] == 200
            got = await call(http, proxy, "/v1/renders/1", {"X-API-Key": cold})
            assert got[:2] == (503, "tenant_store_unavailable")
        finally:
            await postgres_server.astart()
    finally:
        output = proxy.output()
    assert "Traceback" not in output
