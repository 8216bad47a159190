"""Custom-domain verification end to end (CONTRACT §12): real Postgres, the loopback DNS server
of the fixtures (tests/dnsserver.py) and real proxy processes whose verifier checks through it.

HTTP_FILE checks connect to the address the DNS server gives (127.0.0.1) on
``domains.http_port``, which is the proxy's own public port: the proxy answers its own challenge.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import psutil
import pytest

from tests.dnsserver import LoopbackDns
from tests.e2e.support import run_cli, seeded_database, within
from tests.procs import Echo, Proxy, free_port, start_proxy, stop, write_config
from tests.servers import PostgresServer

ACME = "dddddddd-0000-0000-0000-000000000001"
GLOBEX = "dddddddd-0000-0000-0000-000000000002"
INITECH = "dddddddd-0000-0000-0000-000000000003"


async def _seed(conn: asyncpg.Connection) -> None:
    await conn.execute(
        """INSERT INTO identity.tenants (id, slug, name, status, custom_domain, domain_verified)
           VALUES ($1, 'acme', 'Acme', 'Active', NULL, false),
                  ($2, 'globex', 'Globex', 'Active', 'shop.globex.test', true),
                  ($3, 'initech', 'Initech', 'Active', 'old.initech.test', true)""",
        ACME,
        GLOBEX,
        INITECH,
    )


@pytest.fixture(scope="module")
def dsn(postgres_server: PostgresServer) -> str:
    return seeded_database(postgres_server, "domains", _seed)


def _config(tmp: Path, echo: Echo, dns_server: LoopbackDns, port: int) -> Path:
    return write_config(
        tmp / "edge.toml",
        tenancy={"platform_domains": ["flatrender.test"]},
        domains={
            "verify": True,
            "nameservers": [dns_server.address],
            "http_port": port,
            "allow_networks": ["127.0.0.0/8"],
        },
        upstreams={"render-api": {"urls": [echo.url]}},
        routes=[{"prefix": "/public", "upstream": "render-api", "auth": "none"}],
    )


def _start(config_dir: Path, echo: Echo, dns_server: LoopbackDns, dsn: str) -> Proxy:
    port = free_port()
    config = _config(config_dir, echo, dns_server, port)
    return start_proxy(config, env={"DATABASE_URL": dsn, "EDGE_CONFIG": str(config)}, port=port)


@pytest.fixture(scope="module")
def proxy(
    dsn: str, echo: Echo, dns_server: LoopbackDns, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    p = _start(tmp_path_factory.mktemp("domains"), echo, dns_server, dsn)
    yield p
    stop(p.proc)


async def cli(proxy: Proxy, *args: str) -> tuple[int, list[dict[str, object]], str]:
    """``python -m proxy ARGS`` with the proxy's configuration and database."""
    return await _cli_env(proxy.env, *args)


async def _cli_env(env: dict[str, str], *args: str) -> tuple[int, list[dict[str, object]], str]:
    code, out, err = await run_cli(*args, env=env)
    return code, [json.loads(line) for line in out.splitlines()], err


def _domain() -> str:
    return f"v{uuid.uuid4().hex[:10]}.acme-videos.test"


async def _tenant(db: asyncpg.Connection) -> tuple[str, str]:
    """A fresh Active tenant of the test's own: (id, slug)."""
    slug = f"t{uuid.uuid4().hex[:10]}"
    tenant_id = await db.fetchval(
        "INSERT INTO identity.tenants (slug, name, status) VALUES ($1, $2, 'Active')"
        " RETURNING id::text",
        slug,
        slug,
    )
    return tenant_id, slug


async def _row(db: asyncpg.Connection, row_id: object) -> asyncpg.Record:
    return await db.fetchrow(
        """SELECT v.*, c.checks, c.next_check_at FROM identity.tenant_domain_verifications v
           LEFT JOIN identity.edge_domain_checks c ON c.verification_id = v.id
           WHERE v.id = $1::uuid""",
        row_id,
    )


async def _served(http: aiohttp.ClientSession, proxy: Proxy, domain: str) -> tuple[int, int]:
    async with http.get(f"{proxy.url}/public/x", headers={"Host": domain}) as r:
        public = r.status
    async with http.get(f"http://127.0.0.1:{proxy.admin_port}/tls/allowed?domain={domain}") as r:
        return public, r.status


async def test_http_file_verified_then_served_and_allowed(
    proxy: Proxy, dns_server: LoopbackDns, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    domain = _domain()
    dns_server.set(domain, "A", "127.0.0.1")  # the reseller pointed the domain at the edge
    code, out, err = await cli(proxy, "domains", "add", "--tenant", "acme", "--domain", domain)
    assert code == 0, err
    added = out[0]
    assert set(added) == {"id", "domain", "method", "token", "expires_at", "instructions"}
    assert (added["domain"], added["method"]) == (domain, "HTTP_FILE")
    token = str(added["token"])
    assert len(token) >= 32
    assert added["instructions"]["url"] == (  # type: ignore[index]
        f"http://{domain}/.well-known/flatrender-challenge/{token}"
    )
    expires = datetime.fromisoformat(str(added["expires_at"]))
    assert abs(expires - (datetime.now(UTC) + timedelta(days=7))) < timedelta(minutes=1)
    tenant = await db.fetchrow("SELECT * FROM identity.tenants WHERE id = $1", ACME)
    assert (tenant["custom_domain"], tenant["domain_verified"]) == (domain, False)

    async def verified() -> bool:
        return bool((await _row(db, added["id"]))["verified"])

    took = await within(3.0, verified)
    row = await _row(db, added["id"])
    assert row["method"] == "HTTP_FILE" and row["challenge_token"] == token
    assert row["verified_at"] is not None and row["last_checked_at"] is not None
    assert row["checks"] == 1
    assert row["next_check_at"] == row["last_checked_at"] + timedelta(seconds=60)
    assert await db.fetchval("SELECT domain_verified FROM identity.tenants WHERE id = $1", ACME)
    assert dns_server.count(domain, "A") == 1  # one check, one lookup

    async def served() -> bool:
        return await _served(http, proxy, domain) == (200, 200)

    served_after = await within(1.0, served)
    print(f"verified {took:.2f}s after `domains add`, served {served_after:.2f}s later")
    async with http.get(f"http://127.0.0.1:{proxy.admin_port}/metrics") as r:
        metrics = await r.text()
    assert 'edge_domain_checks_total{method="HTTP_FILE",outcome="passed"} 1.0' in metrics


async def test_dns_txt_passes_once_the_record_appears(
    proxy: Proxy, dns_server: LoopbackDns, db: asyncpg.Connection
) -> None:
    tenant_id, slug = await _tenant(db)
    domain = _domain()
    txt = f"_flatrender-challenge.{domain}"
    code, out, err = await cli(
        proxy, "domains", "add", "--tenant", slug, "--domain", domain, "--method", "dns"
    )
    assert code == 0, err
    added = out[0]
    assert added["method"] == "DNS_TXT"
    assert added["instructions"]["record_name"] == txt  # type: ignore[index]
    assert added["instructions"]["record_value"] == added["token"]  # type: ignore[index]

    async def checked_once() -> bool:
        return (await _row(db, added["id"]))["checks"] == 1

    await within(3.0, checked_once)  # at once: no record yet, so it failed
    row = await _row(db, added["id"])
    assert not row["verified"] and row["last_checked_at"] is not None

    dns_server.set(txt, "TXT", "not-the-token")
    code, out, err = await cli(proxy, "domains", "check", "--domain", domain)
    assert code == 0, err
    assert out == [
        {
            "id": added["id"],
            "domain": domain,
            "method": "DNS_TXT",
            "verified": False,
            "error": "token_mismatch",
        }
    ]
    assert not (await _row(db, added["id"]))["verified"]

    dns_server.set(txt, "TXT", "v=other", str(added["token"]))
    code, out, err = await cli(proxy, "domains", "check", "--domain", domain)
    assert code == 0, err
    assert [(line["verified"], line["error"]) for line in out] == [(True, None)]
    row = await _row(db, added["id"])
    assert row["verified"] and row["checks"] == 3
    tenant = await db.fetchrow("SELECT * FROM identity.tenants WHERE id = $1", tenant_id)
    assert (tenant["custom_domain"], tenant["domain_verified"]) == (domain, True)
    # Verified: checked no more, by the verifier or by hand.
    code, out, _ = await cli(proxy, "domains", "check", "--domain", domain)
    assert (code, out) == (0, [])


async def test_an_expired_row_is_never_checked_again(
    proxy: Proxy, dns_server: LoopbackDns, db: asyncpg.Connection
) -> None:
    expired, control = _domain(), _domain()
    for d in (expired, control):
        dns_server.set(f"_flatrender-challenge.{d}", "TXT", "nope")
    rows = {}
    for d, ttl in ((expired, -1), (control, 3600)):
        rows[d] = await db.fetchval(
            """INSERT INTO identity.tenant_domain_verifications
               (tenant_id, domain, method, challenge_token, expires_at)
               VALUES ($1, $2, 'DNS_TXT', 'tok', now() + make_interval(secs => $3))
               RETURNING id""",
            GLOBEX,
            d,
            ttl,
        )

    async def control_checked() -> bool:
        return dns_server.count(f"_flatrender-challenge.{control}", "TXT") == 1

    await within(3.0, control_checked)  # the pass that would have taken the expired row too
    code, out, _ = await cli(proxy, "domains", "check", "--domain", expired)
    assert (code, out) == (0, [])
    assert dns_server.count(f"_flatrender-challenge.{expired}", "TXT") == 0
    row = await _row(db, rows[expired])
    assert row["last_checked_at"] is None and row["checks"] is None


async def test_two_proxies_check_a_row_no_more_often_than_its_schedule(
    proxy: Proxy,
    dsn: str,
    echo: Echo,
    dns_server: LoopbackDns,
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    second = _start(tmp_path, echo, dns_server, dsn)
    try:
        _, slug = await _tenant(db)
        domain = _domain()
        txt = f"_flatrender-challenge.{domain}"
        code, out, err = await cli(
            second, "domains", "add", "--tenant", slug, "--domain", domain, "--method", "dns"
        )
        assert code == 0, err
        row_id = out[0]["id"]

        async def queries(n: int) -> bool:
            return dns_server.count(txt, "TXT") >= n

        await within(3.0, lambda: queries(1))
        # Three seconds: three passes of whichever proxy checks, and waits of the other.
        await asyncio.sleep(3.0)
        assert dns_server.count(txt, "TXT") == 1
        first = await _row(db, row_id)
        assert first["checks"] == 1
        assert first["next_check_at"] - first["last_checked_at"] == timedelta(seconds=60)

        # The 60 s pass (moved forward instead of waited for): exactly one more check.
        await db.execute(
            """UPDATE identity.edge_domain_checks SET next_check_at = now()
               WHERE verification_id = $1::uuid""",
            row_id,
        )
        await within(3.0, lambda: queries(2))
        await asyncio.sleep(3.0)
        assert dns_server.count(txt, "TXT") == 2
        again = await _row(db, row_id)
        assert again["checks"] == 2
        assert again["next_check_at"] - again["last_checked_at"] == timedelta(seconds=90)
    finally:
        stop(second.proc)


def _holder(dsn_db: str, procs: list[Proxy], client_port: int) -> Proxy:
    for p in procs:
        conns = psutil.Process(p.proc.pid).net_connections(kind="tcp")
        if any(c.laddr and c.laddr.port == client_port for c in conns):
            return p
    raise AssertionError(f"no proxy holds the verifier lock of {dsn_db}")


async def test_the_lock_is_taken_over_when_its_holder_dies(
    migrated_dsn: str,
    echo: Echo,
    dns_server: LoopbackDns,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    dsn = migrated_dsn
    db = await asyncpg.connect(dsn)
    try:
        await _seed(db)
        proxies = [_start(tmp_path_factory.mktemp("p"), echo, dns_server, dsn) for _ in range(2)]
        try:
            holder_port = None

            async def locked() -> bool:
                nonlocal holder_port
                holder_port = await db.fetchval(
                    """SELECT a.client_port FROM pg_locks l
                       JOIN pg_stat_activity a ON a.pid = l.pid
                       WHERE l.locktype = 'advisory' AND l.granted
                         AND l.database = (SELECT oid FROM pg_database
                                           WHERE datname = current_database())"""
                )
                return holder_port is not None

            await within(5.0, locked)
            assert holder_port is not None
            holder = _holder(dsn, proxies, holder_port)
            survivor = next(p for p in proxies if p is not holder)
            holder.proc.send_signal(signal.SIGKILL)
            holder.proc.wait(10)
            killed_at = time.monotonic()

            domain = _domain()
            dns_server.set(domain, "A", "127.0.0.1")
            code, out, err = await cli(
                survivor, "domains", "add", "--tenant", "acme", "--domain", domain
            )
            assert code == 0, err

            async def verified() -> bool:
                return bool(
                    await db.fetchval(
                        "SELECT verified FROM identity.tenant_domain_verifications"
                        " WHERE id = $1::uuid",
                        out[0]["id"],
                    )
                )

            await within(5.0, verified)
            print(f"verified by the survivor {time.monotonic() - killed_at:.2f}s after the kill")
        finally:
            for p in proxies:
                stop(p.proc)
    finally:
        await db.close()


async def _snapshot(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch(
        """SELECT to_jsonb(t)::text FROM identity.tenants t
           UNION ALL SELECT to_jsonb(v)::text FROM identity.tenant_domain_verifications v
           UNION ALL SELECT to_jsonb(c)::text FROM identity.edge_domain_checks c ORDER BY 1"""
    )
    return [r[0] for r in rows]


REFUSALS = [
    ("acme", "192.0.2.7", (), "IP address"),
    ("acme", "[2001:db8::1]:443", (), "IP address"),
    ("acme", "flatrender.test", (), "platform name"),  # the apex
    ("acme", "FlatRender.TEST.", (), "platform name"),  # normalised as a Host first
    ("acme", "globex.flatrender.test", (), "platform name"),  # another tenant's slug host
    ("acme", "shop.globex.test", (), "another tenant"),
    ("acme", "SHOP.Globex.test:8443", ("--replace",), "another tenant"),
    ("initech", "new.initech.test", (), "--replace"),  # its verified domain would go
    ("initech", "old.initech.test", (), "already"),  # its own verified domain again
    ("initech", "old.initech.test", ("--replace",), "already"),
    ("nosuch", "shop.nosuch.test", (), "no tenant"),
    ("acme", "*.acme.test", (), "not a host name"),
    ("acme", "bad domain", (), "not a host name"),
    ("acme", "shop.acme.test", ("--method", "email"), "invalid choice"),
]


async def test_every_refusal_is_one_line_and_changes_nothing(
    proxy: Proxy, db: asyncpg.Connection
) -> None:
    before = await _snapshot(db)
    results = await asyncio.gather(
        *(
            cli(proxy, "domains", "add", "--tenant", tenant, "--domain", domain, *extra)
            for tenant, domain, extra, _ in REFUSALS
        )
    )
    for (_, domain, _, reason), (code, out, err) in zip(REFUSALS, results, strict=True):
        assert (code, out) == (2, []), domain
        assert err.count("\n") == 1 and reason in err, err
    assert await _snapshot(db) == before


async def test_replace_moves_a_verified_tenant_to_a_new_domain(
    proxy: Proxy, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    tenant_id, slug = await _tenant(db)
    old = _domain()
    await db.execute(
        "UPDATE identity.tenants SET custom_domain = $2, domain_verified = true WHERE id = $1",
        tenant_id,
        old,
    )
    new = _domain()
    code, out, err = await cli(
        proxy, "domains", "add", "--tenant", slug, "--domain", new.upper() + ".", "--replace"
    )
    assert code == 0, err
    assert out[0]["domain"] == new  # normalised as the Host stage does
    tenant = await db.fetchrow("SELECT * FROM identity.tenants WHERE id = $1", tenant_id)
    assert (tenant["custom_domain"], tenant["domain_verified"]) == (new, False)

    async def old_gone() -> bool:
        return await _served(http, proxy, old) == (404, 404)

    await within(1.0, old_gone)  # the old domain is no longer the tenant's


async def test_check_errors_are_one_line(proxy: Proxy, dsn: str) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    dead_db = {"DATABASE_URL": dead, "EDGE_CONFIG": proxy.env["EDGE_CONFIG"]}
    results = await asyncio.gather(
        cli(proxy, "domains", "check", "--domain", "not a domain"),
        cli(proxy, "domains", "check", "--bogus"),
        _cli_env(dead_db, "domains", "check"),
        _cli_env(dead_db, "domains", "add", "--tenant", "acme", "--domain", "x.acme.test"),
        _cli_env({"EDGE_CONFIG": proxy.env["EDGE_CONFIG"]}, "domains", "check"),
    )
    for code, out, err in results:
        assert (code, out) == (2, [])
        assert err.count("\n") == 1 and "Traceback" not in err, err


async def test_domains_check_makes_one_pass_over_the_rows_that_are_due(
    migrated_dsn: str, echo: Echo, dns_server: LoopbackDns, tmp_path: Path
) -> None:
    """No proxy runs on this database: the command is the only checker, and what it prints is
    exactly the schedule's due rows."""
    config = _config(tmp_path, echo, dns_server, free_port())
    env = {"DATABASE_URL": migrated_dsn, "EDGE_CONFIG": str(config)}
    db = await asyncpg.connect(migrated_dsn)
    try:
        await _seed(db)
        _, slug = await _tenant(db)
        domain = _domain()
        code, added, err = await _cli_env(
            env, "domains", "add", "--tenant", slug, "--domain", domain, "--method", "dns"
        )
        assert code == 0, err
        code, out, err = await _cli_env(env, "domains", "check")
        assert code == 0, err
        assert out == [
            {
                "id": added[0]["id"],
                "domain": domain,
                "method": "DNS_TXT",
                "verified": False,
                "error": "dns_nxdomain",
            }
        ]
        # Checked once: due again in 60 s, so a second pass now has nothing to do.
        code, out, err = await _cli_env(env, "domains", "check")
        assert (code, out, err) == (0, [], "")
        assert dns_server.count(f"_flatrender-challenge.{domain}", "TXT") == 1
    finally:
        await db.close()
