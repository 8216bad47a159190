"""A real TLS front: Debian's caddy running deploy/Caddyfile in front of a proxy in database
mode (CONTRACT §3 ``/tls/allowed``, §7 forwarding). Caddy's issuer is its own local CA
(``EDGE_TLS_ISSUER=internal``): no ACME, nothing leaves the machine. The client connects to
127.0.0.1 with the custom domain as SNI and Host; where a request must succeed it verifies the
certificate against the root of Caddy's local CA (read from Caddy's data directory), and where
a handshake must fail it verifies nothing, so the failure can only mean that Caddy had no
certificate to present."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from proxy.domains.checks import Checker, Outcome
from proxy.domains.resolver import DnsResolver
from proxy.settings import HostPort
from proxy.webhooks.destinations import Policy
from tests.dnsserver import LoopbackDns
from tests.e2e.support import seeded_database, within
from tests.procs import ROOT, Echo, Proxy, free_port, start_proxy, stop, wait_port, write_config
from tests.servers import PostgresServer

CADDYFILE = ROOT / "deploy" / "Caddyfile"
VERIFIED = "videos.acme.test"
UNVERIFIED = "videos.pending.test"
SUSPENDED = "videos.frozen.test"
LATER = "videos.later.test"  # unverified at first; a test verifies it while Caddy runs
ISSUANCE_S = 15.0  # a first handshake makes Caddy ask the edge, then sign a certificate


@pytest.fixture(scope="module")
def dsn(postgres_server: PostgresServer) -> str:
    async def seed(conn: asyncpg.Connection) -> None:
        rows = [
            ("acme", "Active", VERIFIED, True),
            ("pending", "Active", UNVERIFIED, False),
            ("frozen", "Suspended", SUSPENDED, True),
            ("later", "Active", LATER, False),
        ]
        for slug, status, domain, verified in rows:
            await conn.execute(
                """INSERT INTO identity.tenants (id, slug, name, status, custom_domain,
                   domain_verified) VALUES ($1, $2, $3, $4, $5, $6)""",
                str(uuid.uuid4()),
                slug,
                slug.title(),
                status,
                domain,
                verified,
            )

    return seeded_database(postgres_server, "caddy", seed)


@pytest.fixture(scope="module")
def proxy(dsn: str, echo: Echo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    config = write_config(
        tmp_path_factory.mktemp("caddy-edge") / "edge.toml",
        # Caddy connects from 127.0.0.1: its X-Forwarded-* headers are believed.
        server={"trusted_proxies": ["127.0.0.1/32"]},
        tenancy={"platform_domains": ["flatrender.test"]},
        upstreams={"render-api": {"urls": [echo.url]}},
        routes=[{"prefix": "/public", "upstream": "render-api", "auth": "none"}],
    )
    p = start_proxy(config, env={"DATABASE_URL": dsn})
    yield p
    stop(p.proc)


@dataclass
class Caddy:
    https_port: int
    http_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def root_ca(self) -> Path:
        """The certificate of Caddy's local CA, created in its data directory at start."""
        return self.data_dir / "caddy" / "pki" / "authorities" / "local" / "root.crt"


@pytest.fixture(scope="module")
def caddy(proxy: Proxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Caddy]:
    binary = shutil.which("caddy")
    assert binary, "caddy is not installed: run scripts/ensure-test-servers.sh"
    home = tmp_path_factory.mktemp("caddy")
    https_port, http_port = free_port(), free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        # Caddy keeps certificates, its CA and its autosaved config under these: all in the
        # test's own directory, nothing in the machine's.
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "CADDY_ADMIN": f"127.0.0.1:{free_port()}",
        "CADDY_BIND": "127.0.0.1",
        "CADDY_PROTOCOLS": "h1 h2",  # no QUIC listener (UDP) for a test that speaks TCP only
        "CADDY_HTTP_PORT": str(http_port),
        "CADDY_HTTPS_PORT": str(https_port),
        "EDGE_ADMIN": f"127.0.0.1:{proxy.admin_port}",
        "EDGE_PUBLIC": f"127.0.0.1:{proxy.port}",
        "EDGE_TLS_ISSUER": "internal",
    }
    log = home / "caddy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, "run", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
            env=env,
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running = Caddy(https_port, http_port, home / "data", proc, log)

    async def root_created() -> bool:
        return running.root_ca.is_file()

    try:
        wait_port(https_port, proc)
        asyncio.run(within(ISSUANCE_S, root_created))
        yield running
    finally:
        stop(proc)


def _verifying(caddy: Caddy) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(caddy.root_ca))


def _blind() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def handshake(caddy: Caddy, name: str, ctx: ssl.SSLContext) -> bool:
    """Whether a TLS handshake with ``name`` as SNI completes."""
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", caddy.https_port, ssl=ctx, server_hostname=name
        )
    except (ssl.SSLError, ConnectionResetError):
        return False
    writer.close()
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        await writer.wait_closed()
    return True


async def https_get(caddy: Caddy, name: str) -> tuple[int, dict[str, str]]:
    """GET https://<name>/public/x through Caddy, the certificate verified for ``name``;
    returns the status and the headers the upstream received."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"https://127.0.0.1:{caddy.https_port}/public/x",
            headers={"Host": name},
            server_hostname=name,
            ssl=_verifying(caddy),
        ) as r,
    ):
        body = await r.json()
        return r.status, {k.lower(): v for k, v in body.get("headers", [])}


async def test_a_verified_custom_domain_is_served_over_https(caddy: Caddy) -> None:
    await within(ISSUANCE_S, lambda: handshake(caddy, VERIFIED, _verifying(caddy)))
    status, seen = await https_get(caddy, VERIFIED)
    assert status == 200
    assert seen["x-forwarded-host"] == VERIFIED
    # Caddy's X-Forwarded-Proto, believed because Caddy's address is in trusted_proxies.
    assert seen["x-forwarded-proto"] == "https"


@pytest.mark.parametrize(
    "name",
    [UNVERIFIED, SUSPENDED, "nobody.example", "acme.flatrender.test", "flatrender.test"],
    ids=["unverified", "suspended tenant", "unknown", "platform slug", "platform apex"],
)
async def test_no_certificate_for_a_name_the_edge_does_not_vouch_for(
    caddy: Caddy, proxy: Proxy, name: str
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{proxy.admin_port}/tls/allowed?domain={name}") as r,
    ):
        assert r.status == 404
    assert not await handshake(caddy, name, _blind())


async def test_verifying_a_domain_makes_it_servable_without_a_restart(
    caddy: Caddy, dsn: str
) -> None:
    assert not await handshake(caddy, LATER, _blind())
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "UPDATE identity.tenants SET domain_verified = true WHERE custom_domain = $1", LATER
        )
    finally:
        await conn.close()
    await within(ISSUANCE_S, lambda: handshake(caddy, LATER, _verifying(caddy)))
    status, seen = await https_get(caddy, LATER)
    assert (status, seen["x-forwarded-host"]) == (200, LATER)
    assert caddy.proc.poll() is None  # the same Caddy process throughout


async def test_the_domain_challenge_passes_through_caddy_over_plain_http(
    caddy: Caddy, dsn: str, dns_server: LoopbackDns
) -> None:
    """What the verifier sees on port 80 behind this Caddyfile (CONTRACT §12): the edge's answer
    to the challenge, not a redirect to HTTPS (the domain has no certificate yet)."""
    token = "caddy-passes-the-challenge-0123456789abcdef"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """INSERT INTO identity.tenant_domain_verifications
               (tenant_id, domain, method, challenge_token, expires_at)
               SELECT id, custom_domain, 'HTTP_FILE', $2, now() + interval '1 hour'
                 FROM identity.tenants WHERE custom_domain = $1""",
            UNVERIFIED,
            token,
        )
    finally:
        await conn.close()
    dns_server.set(UNVERIFIED, "A", "127.0.0.1")
    async with aiohttp.ClientSession() as http:
        checker = Checker(
            http,
            DnsResolver([HostPort("127.0.0.1", dns_server.port)], 5.0),
            caddy.http_port,
            policy=Policy(allow_http=True, allow_networks=[ipaddress.ip_network("127.0.0.0/8")]),
        )
        assert await checker.check("HTTP_FILE", UNVERIFIED, token) == Outcome(True)
        # Anything else on port 80 still goes to HTTPS.
        async with http.get(
            f"http://127.0.0.1:{caddy.http_port}/public/x",
            headers={"Host": UNVERIFIED},
            allow_redirects=False,
        ) as r:
            assert r.status == 308
            assert r.headers["Location"] == f"https://{UNVERIFIED}/public/x"
