"""What the upstream is told about the client (CONTRACT §7, §10), against real processes: the
``X-Forwarded-Proto``/``-Host`` of a trusted front believed and anyone else's replaced; the
PROXY protocol (v1, v2) believed from a trusted front (its source is the client address on the
upstream's ``X-Forwarded-For`` and in the audit row) and refused from anyone else; the W3C
``traceparent`` continued with the proxy's own span id, or passed through unchanged when the
SDK is disabled. Peers are told apart by source address: 127.0.0.1 is the trusted front,
127.0.0.2 any other client."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import struct
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.support import audit_rows, metric, start_audited_proxy, wait_for
from tests.procs import Echo, Proxy, raw_request, start_proxy, stop, write_config

HOST = "videos.acme.test"
TRUSTED, UNTRUSTED = "127.0.0.1", "127.0.0.2"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
INBOUND = f"00-{TRACE_ID}-{PARENT_ID}-01"


def _proxy(tmp: Path, echo: Echo, env: dict[str, str] | None = None) -> Proxy:
    config = write_config(
        tmp / "edge.toml",
        server={"trusted_proxies": [f"{TRUSTED}/32"]},
        upstreams={"render-api": {"urls": [echo.url]}},
        routes=[{"prefix": "/public", "upstream": "render-api", "auth": "none"}],
    )
    return start_proxy(config, env)


@pytest.fixture(scope="module")
def proxy(echo: Echo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = _proxy(tmp_path_factory.mktemp("fronts"), echo)
    yield p
    stop(p.proc)


def _echoed(proxy: Proxy, *lines: str, source: str = TRUSTED, host: str = HOST) -> dict[str, Any]:
    head = "".join(f"{line}\r\n" for line in lines)
    r = raw_request(
        proxy.port,
        f"GET /public/x HTTP/1.1\r\nHost: {host}\r\n{head}Connection: close\r\n\r\n".encode(),
        source=source,
    )
    assert r.status == 200, r.body
    echoed: dict[str, Any] = json.loads(r.body)
    return echoed


def _all(echoed: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echoed["headers"] if k.lower() == name.lower()]


# --------------------------------------------------------------------------- X-Forwarded-*


def test_a_trusted_fronts_forwarded_proto_and_host_are_believed_port_included(
    proxy: Proxy,
) -> None:
    echoed = _echoed(
        proxy,
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: videos.acme.test:8443",
        host=f"{HOST}:8080",
    )
    assert _all(echoed, "X-Forwarded-Proto") == ["https"]
    assert _all(echoed, "X-Forwarded-Host") == ["videos.acme.test:8443"]


def test_anyone_elses_forwarded_proto_and_host_are_replaced_by_the_proxys_own_view(
    proxy: Proxy,
) -> None:
    echoed = _echoed(
        proxy,
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: evil.example",
        source=UNTRUSTED,
        host="Videos.Acme.Test:8080",
    )
    # The scheme of the connection received, and the Host header exactly as sent.
    assert _all(echoed, "X-Forwarded-Proto") == ["http"]
    assert _all(echoed, "X-Forwarded-Host") == ["Videos.Acme.Test:8080"]


def test_what_a_trusted_front_leaves_out_is_the_proxys_own_view(proxy: Proxy) -> None:
    echoed = _echoed(proxy, "X-Forwarded-Proto: https", host=f"{HOST}:8080")
    assert _all(echoed, "X-Forwarded-Proto") == ["https"]
    assert _all(echoed, "X-Forwarded-Host") == [f"{HOST}:8080"]
    echoed = _echoed(proxy)
    assert _all(echoed, "X-Forwarded-Proto") == ["http"]
    assert _all(echoed, "X-Forwarded-Host") == [HOST]


# --------------------------------------------------------------------------- traceparent


def test_with_exporter_none_the_upstream_continues_the_clients_trace(proxy: Proxy) -> None:
    # The proxy runs with no OTEL_* variables: exporter "none", the default.
    first = _all(_echoed(proxy, f"traceparent: {INBOUND}"), "traceparent")
    second = _all(_echoed(proxy, f"traceparent: {INBOUND}"), "traceparent")
    for sent in (first, second):
        assert len(sent) == 1
        version, trace_id, span_id, flags = sent[0].split("-")
        assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
        assert span_id != PARENT_ID and re.fullmatch(r"[0-9a-f]{16}", span_id)
    assert first != second  # a span id per request
    fresh = _all(_echoed(proxy), "traceparent")
    assert len(fresh) == 1 and TRACE_ID not in fresh[0]


def test_with_the_sdk_disabled_the_clients_traceparent_passes_unchanged(
    echo: Echo, tmp_path: Path
) -> None:
    proxy = _proxy(tmp_path, echo, {"OTEL_SDK_DISABLED": "true"})
    try:
        assert _all(_echoed(proxy, f"traceparent: {INBOUND}"), "traceparent") == [INBOUND]
        assert _all(_echoed(proxy), "traceparent") == []  # none sent: none forwarded
    finally:
        stop(proxy.proc)


# --------------------------------------------------------------------------- PROXY protocol

CLIENT_V4, CLIENT_V6 = "203.0.113.7", "2001:db8::7"
V1 = f"PROXY TCP4 {CLIENT_V4} 127.0.0.1 56324 8080\r\n".encode()
SSL_TLV = b"\x20\x00\x05\x01\x00\x00\x00\x00"  # PP2_TYPE_SSL, PP2_CLIENT_SSL
V2_ADDRESSES = (
    ipaddress.IPv6Address(CLIENT_V6).packed
    + ipaddress.IPv6Address("2001:db8::1").packed
    + struct.pack("!HH", 56324, 443)
)
V2 = (
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x21"
    + struct.pack("!H", len(V2_ADDRESSES) + len(SSL_TLV))
    + V2_ADDRESSES
    + SSL_TLV
)


@pytest.fixture(scope="module")
def fronted(echo: Echo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proxy, Path]]:
    proxy, audit = start_audited_proxy(
        tmp_path_factory.mktemp("proxy-protocol"),
        upstreams={"render-api": {"urls": [echo.url]}},
        routes=[{"prefix": "/public", "upstream": "render-api", "auth": "none", "audit": True}],
        proxy_protocol=True,
    )
    yield proxy, audit
    stop(proxy.proc)


def _get(rid: str, *extra: str) -> bytes:
    head = "".join(f"{line}\r\n" for line in extra)
    return (
        f"GET /public/x HTTP/1.1\r\nHost: {HOST}\r\nX-Request-Id: {rid}\r\n{head}"
        "Connection: close\r\n\r\n"
    ).encode()


def _row(audit: Path, rid: str) -> dict[str, Any]:
    def rows() -> list[dict[str, Any]]:
        return [r for r in audit_rows(audit) if r["request_id"] == rid]

    assert wait_for(lambda: len(rows()) == 1, 10), f"no audit row for {rid}"
    return rows()[0]


@pytest.mark.parametrize(
    ("preamble", "client", "proto"),
    [(V1, CLIENT_V4, "http"), (V2, CLIENT_V6, "https")],
    ids=["v1", "v2-tls"],
)
def test_a_proxy_header_from_a_trusted_front_names_the_client_everywhere(
    fronted: tuple[Proxy, Path], preamble: bytes, client: str, proto: str
) -> None:
    proxy, audit = fronted
    rid = str(uuid.uuid4())
    # The client's own X-Forwarded-For is only its claim: the client is not a trusted proxy.
    r = raw_request(
        proxy.port, preamble + _get(rid, "X-Forwarded-For: 198.51.100.1"), source=TRUSTED
    )
    assert r.status == 200, r.body
    echoed = json.loads(r.body)
    assert _all(echoed, "X-Forwarded-For") == [client]
    # v2's SSL TLV says the client's own connection was TLS.
    assert _all(echoed, "X-Forwarded-Proto") == [proto]
    assert _row(audit, rid)["ip_address"] == client


def test_the_source_holds_for_every_request_on_the_connection(
    fronted: tuple[Proxy, Path],
) -> None:
    proxy, audit = fronted
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    keep = _get(first).replace(b"Connection: close\r\n", b"")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(V1 + keep + _get(second))
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 200") == 2
    assert _row(audit, first)["ip_address"] == _row(audit, second)["ip_address"] == CLIENT_V4


def test_a_trusted_front_may_also_send_no_proxy_header(fronted: tuple[Proxy, Path]) -> None:
    proxy, audit = fronted
    rid = str(uuid.uuid4())
    r = raw_request(proxy.port, _get(rid, "X-Forwarded-For: 198.51.100.1"), source=TRUSTED)
    assert r.status == 200
    assert _all(json.loads(r.body), "X-Forwarded-For") == [f"198.51.100.1, {TRUSTED}"]
    assert _row(audit, rid)["ip_address"] == "198.51.100.1"


def _closed_without_answer(port: int, data: bytes, source: str) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        try:
            s.sendall(data)
            return s.recv(65536) == b""
        except ConnectionResetError:
            return True


@pytest.mark.parametrize("preamble", [V1, V2], ids=["v1", "v2"])
def test_the_same_header_from_anyone_else_is_refused_without_an_answer(
    fronted: tuple[Proxy, Path], echo: Echo, preamble: bytes
) -> None:
    proxy, audit = fronted
    rid = str(uuid.uuid4())
    before = metric(proxy.admin_port, "edge_connection_refusals_total")
    assert _closed_without_answer(proxy.port, preamble + _get(rid), UNTRUSTED)
    assert (
        metric(proxy.admin_port, "edge_connection_refusals_total", reason="proxy_header_untrusted")
        >= 1
    )
    assert metric(proxy.admin_port, "edge_connection_refusals_total") == before + 1
    with urllib.request.urlopen(f"{echo.url}/__count/{rid}", timeout=5) as counted:
        assert json.load(counted)["count"] == 0
    # The same client without the header is served, as itself.
    rid = str(uuid.uuid4())
    r = raw_request(proxy.port, _get(rid), source=UNTRUSTED)
    assert r.status == 200
    assert _row(audit, rid)["ip_address"] == UNTRUSTED


def test_a_malformed_header_from_a_trusted_front_is_refused_without_an_answer(
    fronted: tuple[Proxy, Path],
) -> None:
    proxy, _ = fronted
    bad = b"PROXY TCP4 203.0.113.7 127.0.0.1 8_0 8080\r\n"
    assert _closed_without_answer(proxy.port, bad + _get(str(uuid.uuid4())), TRUSTED)
    assert (
        metric(proxy.admin_port, "edge_connection_refusals_total", reason="proxy_header_malformed")
        == 1
    )
