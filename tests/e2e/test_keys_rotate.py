"""``python -m proxy keys rotate`` against real Postgres and a running proxy (CONTRACT §5)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from proxy.stores.keyadmin import create_key
from tests.e2e.support import run_cli, seeded_database, within
from tests.procs import Echo, Proxy, start_proxy, stop, write_config
from tests.servers import PostgresServer

ACME = "eeeeeeee-0000-0000-0000-000000000001"
HOST = "acme.flatrender.test"
COPIED = ("tenant_id", "name", "environment", "scopes", "allowed_ips", "rate_limit_rpm")


@pytest.fixture(scope="module")
def dsn(postgres_server: PostgresServer) -> str:
    async def seed(conn: asyncpg.Connection) -> None:
        await conn.execute(
            "INSERT INTO identity.tenants (id, slug, name, status)"
            " VALUES ($1, 'acme', 'A', 'Active')",
            ACME,
        )

    return seeded_database(postgres_server, "rotate", seed)


@pytest.fixture(scope="module")
def proxy(dsn: str, echo: Echo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    config = write_config(
        Path(tmp_path_factory.mktemp("rotate")) / "edge.toml",
        tenancy={"platform_domains": ["flatrender.test"]},
        upstreams={"render-api": {"urls": [echo.url]}},
        routes=[
            {
                "prefix": "/v1/renders",
                "upstream": "render-api",
                "auth": "api_key",
                "scopes": {"GET": "renders:read"},
            }
        ],
    )
    p = start_proxy(config, env={"DATABASE_URL": dsn})
    yield p
    stop(p.proc)


async def mint(
    db: asyncpg.Connection,
    *,
    environment: str = "live",
    expires_at: datetime | None = None,
) -> tuple[str, str]:
    new = await create_key(
        db,
        tenant_slug="acme",
        name=f"server-{uuid.uuid4().hex[:6]}",
        environment=environment,  # type: ignore[arg-type]
        scopes=["renders:read", "projects:*"],
        rpm=1234,
        allowed_ips=["127.0.0.0/8", "10.1.0.0/16"],
        expires_at=expires_at,
    )
    return new.id, new.key


async def rotate(proxy: Proxy, *args: str) -> tuple[int, dict[str, str] | None, str]:
    code, out, err = await run_cli("keys", "rotate", *args, env=proxy.env)
    return code, json.loads(out) if out.strip() else None, err


async def status(http: aiohttp.ClientSession, proxy: Proxy, key: str) -> tuple[int, str | None]:
    async with http.get(f"{proxy.url}/v1/renders/1", headers={"Host": HOST, "X-API-Key": key}) as r:
        body = await r.json()
        return r.status, body["error"]["code"] if r.status >= 400 else None


async def served(http: aiohttp.ClientSession, proxy: Proxy, key: str) -> None:
    """A key just created is served within 1 s (CONTRACT §5): with every name preloaded, the
    proxy knows its prefix once the row's NOTIFY arrives, which may be after the commit."""

    async def ok() -> bool:
        return await status(http, proxy, key) == (200, None)

    await within(1.0, ok)


async def _key(db: asyncpg.Connection, key_id: str) -> asyncpg.Record:
    return await db.fetchrow("SELECT * FROM identity.tenant_api_keys WHERE id = $1::uuid", key_id)


async def test_both_keys_work_during_the_grace_then_only_the_new_one(
    proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    old_id, old_key = await mint(db)
    await served(http, proxy, old_key)  # cached by the proxy now
    code, new, err = await rotate(proxy, old_id, "--grace", "3s")
    assert code == 0, err
    assert new is not None and set(new) == {"id", "key", "key_prefix", "last4"}
    assert new["key"].startswith("fr_live_") and new["key"][-4:] == new["last4"]
    old, fresh = await _key(db, old_id), await _key(db, new["id"])
    assert [fresh[c] for c in COPIED] == [old[c] for c in COPIED]
    assert fresh["expires_at"] is None and fresh["is_active"] and fresh["revoked_at"] is None
    assert old["is_active"] and old["revoked_at"] is None
    grace_end = old["expires_at"]
    assert abs(grace_end - (datetime.now(UTC) + timedelta(seconds=3))) < timedelta(seconds=2)

    assert await status(http, proxy, old_key) == (200, None)
    await served(http, proxy, new["key"])
    await asyncio.sleep(max(0.0, (grace_end - datetime.now(UTC)).total_seconds()))

    async def old_refused() -> bool:
        return await status(http, proxy, old_key) == (401, "api_key_expired")

    await within(1.0, old_refused)
    assert await status(http, proxy, new["key"]) == (200, None)


async def test_grace_zero_revokes_the_old_key_at_once(
    proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    old_id, old_key = await mint(db)
    await served(http, proxy, old_key)
    code, new, err = await rotate(proxy, old_id, "--grace", "0")
    assert code == 0 and new is not None, err

    async def old_revoked() -> bool:
        return await status(http, proxy, old_key) == (401, "api_key_revoked")

    await within(1.0, old_revoked)
    old = await _key(db, old_id)
    assert old["revoked_at"] is not None and not old["is_active"]
    await served(http, proxy, new["key"])


async def test_an_earlier_expiry_and_the_environment_are_copied(
    proxy: Proxy, db: asyncpg.Connection
) -> None:
    soon = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    old_id, _ = await mint(db, environment="test", expires_at=soon)
    code, new, err = await rotate(proxy, old_id)  # the default grace, 24h, ends later
    assert code == 0 and new is not None, err
    assert new["key"].startswith("fr_test_")
    old, fresh = await _key(db, old_id), await _key(db, new["id"])
    assert old["expires_at"] == soon  # the earlier of its own and now + grace
    assert fresh["expires_at"] == soon
    assert [fresh[c] for c in COPIED] == [old[c] for c in COPIED]


async def test_refusals_are_one_line_and_change_nothing(
    proxy: Proxy, db: asyncpg.Connection
) -> None:
    revoked_id, _ = await mint(db)
    await db.execute(
        "UPDATE identity.tenant_api_keys SET revoked_at = now(), is_active = false"
        " WHERE id = $1::uuid",
        revoked_id,
    )
    inactive_id, _ = await mint(db)
    await db.execute(
        "UPDATE identity.tenant_api_keys SET is_active = false WHERE id = $1::uuid", inactive_id
    )
    expired_id, _ = await mint(db)
    await db.execute(
        "UPDATE identity.tenant_api_keys SET expires_at = now() - interval '1 second'"
        " WHERE id = $1::uuid",
        expired_id,
    )
    live_id, _ = await mint(db)
    cases = [
        ((revoked_id,), "revoked"),
        ((inactive_id,), "revoked"),
        ((expired_id,), "expired"),
        ((str(uuid.uuid4()),), "no key"),
        (("not-a-uuid",), "not a UUID"),
        ((live_id, "--grace", "31d"), "at most 30d"),
        ((live_id, "--grace", "1.5h"), "--grace"),
        ((live_id, "--grace", "-1s"), "--grace"),
        ((live_id, "--grace", "24"), "--grace"),
    ]
    # Every column but the usage the running proxy writes in the background, at any time.
    rows = (
        "SELECT to_jsonb(k) - '{usage_count,last_used_at,last_used_ip,updated_at}'::text[]"
        " FROM identity.tenant_api_keys k ORDER BY id"
    )
    before = await db.fetch(rows)
    results = await asyncio.gather(*(rotate(proxy, *args) for args, _ in cases))
    for (args, reason), (code, out, err) in zip(cases, results, strict=True):
        assert (code, out) == (2, None), args
        assert err.count("\n") == 1 and reason in err and "Traceback" not in err, err
    assert await db.fetch(rows) == before
