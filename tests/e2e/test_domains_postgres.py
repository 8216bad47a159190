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
    # The verifier checks at once (§12) and may pass before this read: `add` sets the tenant's
    # domain, and its domain_verified only ever moves with the row's verified, in one
    # transaction (one snapshot here).
    tenant = await db.fetchrow(
        """SELECT t.custom_domain, t.domain_verified, v.verified FROM identity.tenants t
           JOIN identity.tenant_domain_verifications v ON v.tenant_id = t.id
           WHERE t.id = $1 AND v.id = $2::uuid""",
        ACME,
        added["id"],
    )
    assert tenant["custom_domain"] == domain
    assert tenant["domain_verified"] == tenant["verified"]

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
        # A row due now, added after that check: once it has been checked, the checker has
        # claimed again since, and the first row was not due.
        await _checker_claimed_again(dns_server, db)
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
        await _checker_claimed_again(dns_server, db)
        assert dns_server.count(txt, "TXT") == 2
        again = await _row(db, row_id)
        assert again["checks"] == 2
        assert again["next_check_at"] - again["last_checked_at"] == timedelta(seconds=90)
    finally:
        stop(second.proc)


async def _checker_claimed_again(dns_server: LoopbackDns, db: asyncpg.Connection) -> None:
    """Return once whichever proxy checks has claimed due rows again (twice, so that a claim
    that was already under way when this was called does not count)."""
    for _ in range(2):
        probe = _domain()
        await db.execute(
            """INSERT INTO identity.tenant_domain_verifications
               (tenant_id, domain, method, challenge_token, expires_at)
               VALUES ($1, $2, 'DNS_TXT', 'probe', now() + interval '1 minute')""",
            GLOBEX,
            probe,
        )

        async def probed(name: str = probe) -> bool:
            return dns_server.count(f"_flatrender-challenge.{name}", "TXT") == 1

        await within(3.0, probed)


async def test_a_new_row_is_checked_at_once_while_another_check_hangs(
    proxy: Proxy, dns_server: LoopbackDns, db: asyncpg.Connection
) -> None:
    """§12 "at once after domains add (within 2 s)": a check that takes its whole 5 s (a host
    that accepts and never answers) does not hold back the rows added meanwhile."""
    accepted = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        accepted.set()
        await reader.read()  # until the checker gives up

    # Another loopback address, on the port HTTP_FILE checks use (the proxy's, on 127.0.0.1).
    hole = await asyncio.start_server(never_answer, "127.0.0.2", proxy.port)
    hole_id = None
    try:
        _, slug = await _tenant(db)
        black_holed = _domain()
        dns_server.set(black_holed, "A", "127.0.0.2")
        code, out, err = await cli(
            proxy, "domains", "add", "--tenant", slug, "--domain", black_holed
        )
        assert code == 0, err
        hole_id = out[0]["id"]
        await asyncio.wait_for(accepted.wait(), 5.0)  # its check is under way, and hangs

        _, slug = await _tenant(db)
        fresh = _domain()
        code, out, err = await cli(
            proxy, "domains", "add", "--tenant", slug, "--domain", fresh, "--method", "dns"
        )
        assert code == 0, err

        async def checked() -> bool:
            return (await _row(db, out[0]["id"]))["last_checked_at"] is not None

        took = await within(2.0, checked)
        print(f"checked {took:.2f}s after `domains add`, beside a hanging check")
        assert (await _row(db, hole_id))["last_checked_at"] is None  # still hanging
    finally:
        for writer in held:
            writer.close()
        hole.close()
        await hole.wait_closed()
        if hole_id is not None:  # not to be checked again by later tests
            await db.execute(
                "UPDATE identity.tenant_domain_verifications SET expires_at = now()"
                " WHERE id = $1::uuid",
                hole_id,
            )


async def test_adding_a_new_domain_expires_the_tenants_other_pending_challenges(
    proxy: Proxy, dns_server: LoopbackDns, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    """A reseller that moves on to another domain leaves no challenge of the old one alive:
    not checked any more, not answered on the challenge path (§3)."""
    _, slug = await _tenant(db)
    first, second = _domain(), _domain()
    code, out, err = await cli(
        proxy, "domains", "add", "--tenant", slug, "--domain", first, "--method", "dns"
    )
    assert code == 0, err
    old = out[0]
    code, out, err = await cli(proxy, "domains", "add", "--tenant", slug, "--domain", first)
    assert code == 0, err
    same_domain = out[0]

    async def answers(domain: str, token: object) -> int:
        path = f"/.well-known/flatrender-challenge/{token}"
        async with http.get(f"{proxy.url}{path}", headers={"Host": domain}) as r:
            return r.status

    async def answered(domain: str, token: object) -> bool:
        return await answers(domain, token) == 200

    await within(1.0, lambda: answered(first, same_domain["token"]))

    code, out, err = await cli(proxy, "domains", "add", "--tenant", slug, "--domain", second)
    assert code == 0, err
    rows = await db.fetch(
        """SELECT v.id::text, v.expires_at <= now() AS expired
             FROM identity.tenant_domain_verifications v
             JOIN identity.tenants t ON t.id = v.tenant_id WHERE t.slug = $1""",
        slug,
    )
    assert {r["id"]: r["expired"] for r in rows} == {
        old["id"]: True,
        same_domain["id"]: True,
        out[0]["id"]: False,
    }

    async def refused() -> bool:
        return await answers(first, same_domain["token"]) == 404

    await within(1.0, refused)
    code, printed, _ = await cli(proxy, "domains", "check", "--domain", first)
    assert (code, printed) == (0, [])  # nothing left to check for the old domain


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
