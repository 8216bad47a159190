"""deploy/haproxy.cfg in front of a proxy with ``server.proxy_protocol = true`` (CONTRACT §7):
Debian's haproxy runs the deploy file itself, with only its addresses made local (Docker's DNS,
the compose service name and the published ports are replaced; the test fails if any of them
is no longer there to replace). haproxy connects from 127.0.0.1, the proxy's one trusted
front; the client connects to haproxy from 127.0.0.3, and that address, carried in haproxy's
PROXY v2 header, is what the upstream and the audit row see."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.support import audit_rows, start_audited_proxy, wait_for
from tests.procs import ROOT, Echo, Proxy, free_port, raw_request, stop, wait_port

HOST = "videos.acme.test"
CLIENT = "127.0.0.3"


def _local(cfg: str, front: int, health: int, proxy: Proxy) -> str:
    """The deploy file with its container addresses replaced by loopback ones."""
    replacements = [
        (r"\nresolvers docker\n(?:[ \t]+\S.*\n)+", "\n"),
        (r" resolvers docker init-addr none", ""),
        (r"check port 9901", f"check port {proxy.admin_port}"),
        (r"server-template edge 2 edge:8080", f"server edge1 127.0.0.1:{proxy.port}"),
        (r"bind :8080", f"bind 127.0.0.1:{front}"),
        (r"bind :8404", f"bind 127.0.0.1:{health}"),
    ]
    for pattern, replacement in replacements:
        cfg, n = re.subn(pattern, replacement, cfg)
        assert n == 1, f"deploy/haproxy.cfg no longer has {pattern!r}"
    return cfg


@pytest.fixture(scope="module")
def stack(echo: Echo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy is not installed (scripts/ensure-test-servers.sh installs it)"
    tmp = tmp_path_factory.mktemp("haproxy")
    proxy, audit = start_audited_proxy(
        tmp,
        upstreams={"render-api": {"urls": [echo.url]}},
        routes=[{"prefix": "/public", "upstream": "render-api", "auth": "none", "audit": True}],
        proxy_protocol=True,
    )
    front, health = free_port(), free_port()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(_local((ROOT / "deploy" / "haproxy.cfg").read_text(), front, health, proxy))
    check = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    log = (tmp / "haproxy.log").open("wb")
    proc = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(front, proc)
        yield front, audit
    finally:
        stop(proc)
        log.close()
        stop(proxy.proc)


def _get(rid: str, *, close: bool = True) -> bytes:
    return (
        f"GET /public/x HTTP/1.1\r\nHost: {HOST}\r\nX-Request-Id: {rid}\r\n"
        "X-Forwarded-For: 198.51.100.1\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    ).encode()


def _row(audit: Path, rid: str) -> dict[str, Any]:
    def rows() -> list[dict[str, Any]]:
        return [r for r in audit_rows(audit) if r["request_id"] == rid]

    assert wait_for(lambda: len(rows()) == 1, 10), f"no audit row for {rid}"
    return rows()[0]


def test_the_client_behind_haproxy_is_the_one_the_upstream_and_the_audit_row_see(
    stack: tuple[int, Path],
) -> None:
    front, audit = stack
    rid = str(uuid.uuid4())
    r = raw_request(front, _get(rid), source=CLIENT)
    assert r.status == 200, r.body
    echoed = json.loads(r.body)
    # The client's own X-Forwarded-For is only its claim; haproxy's PROXY header is believed.
    assert [v for k, v in echoed["headers"] if k.lower() == "x-forwarded-for"] == [CLIENT]
    assert [v for k, v in echoed["headers"] if k.lower() == "x-forwarded-proto"] == ["http"]
    assert _row(audit, rid)["ip_address"] == CLIENT


def test_every_request_of_a_relayed_connection_is_the_clients(stack: tuple[int, Path]) -> None:
    front, audit = stack
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    with socket.create_connection(
        ("127.0.0.1", front), timeout=10, source_address=(CLIENT, 0)
    ) as s:
        s.sendall(_get(first, close=False) + _get(second))
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 200") == 2
    assert _row(audit, first)["ip_address"] == _row(audit, second)["ip_address"] == CLIENT
