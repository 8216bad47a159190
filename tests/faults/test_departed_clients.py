"""Departed clients and a full upstream pool (CONTRACT §7), against real processes.

A client that leaves ends the work done for it: a request still waiting for one of the
upstream's ``max_connections`` is never sent, one in progress is aborted (the stub upstream
sees its connection closed), and the audit row is 499 ``client_closed_request``. Waiting for a
free connection is bounded by ``connect_timeout_s``: then 503 ``upstream_busy`` with
``Retry-After: 1``, the upstream not contacted. The stub counts requests by ``X-Request-Id``
and records which held requests saw their connection closed.
"""

from __future__ import annotations

import json
import socket
import struct
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.support import audit_rows, metric, start_audited_proxy, start_quiet_echo, wait_for
from tests.procs import Echo, Proxy, raw_request, stop

HOST = "videos.acme.test"
PATIENT_WAIT_S = 10  # connect_timeout_s of the upstream the hang-up tests queue on
BUSY_WAIT_S = 1  # connect_timeout_s of the one that answers upstream_busy


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Echo]:
    e = start_quiet_echo(tmp_path_factory.mktemp("echo") / "echo.log")
    yield e
    stop(e.proc)


@pytest.fixture(scope="module")
def stack(echo: Echo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proxy, Path]]:
    # Two single-connection pools on the same stub, so each test fills its own.
    one = {"urls": [echo.url], "max_connections": 1, "read_timeout_s": 30}
    proxy, audit = start_audited_proxy(
        tmp_path_factory.mktemp("departed"),
        upstreams={
            "patient": {**one, "connect_timeout_s": PATIENT_WAIT_S},
            "busy": {**one, "connect_timeout_s": BUSY_WAIT_S},
        },
        routes=[
            {"prefix": "/patient", "upstream": "patient", "auth": "none", "audit": True},
            {"prefix": "/busy", "upstream": "busy", "auth": "none", "audit": True},
        ],
    )
    yield proxy, audit
    stop(proxy.proc)


def _stub(echo: Echo, what: str, rid: str) -> Any:
    with urllib.request.urlopen(f"{echo.url}/__{what}/{rid}", timeout=5) as r:
        return json.load(r)[what]


def _send(port: int, head: str, body: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(head.encode() + body)
    return s


def _hold(port: int, prefix: str, rid: str, seconds: int = 30) -> socket.socket:
    target = f"{prefix}/hold?seconds={seconds}"
    return _send(port, f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\nX-Request-Id: {rid}\r\n\r\n")


def _hang_up(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    s.close()


def _row(audit: Path, rid: str) -> dict[str, Any]:
    def rows() -> list[dict[str, Any]]:
        return [r for r in audit_rows(audit) if r["request_id"] == rid]

    assert wait_for(lambda: len(rows()) == 1, 10), f"no audit row for {rid}"
    return rows()[0]


def _gauge(proxy: Proxy, name: str, upstream: str) -> float:
    return metric(proxy.admin_port, name, upstream=upstream)


def _upload(port: int, rid: str, size: int) -> socket.socket:
    """A POST declaring ``size`` bytes, sending at most 1 MiB of them (what the sockets take)."""
    s = _send(
        port,
        f"POST /patient/renders HTTP/1.1\r\nHost: {HOST}\r\nX-Request-Id: {rid}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n",
    )
    s.settimeout(1)
    piece, sent = b"u" * 65536, 0
    try:
        while sent < min(size, 1 << 20):
            sent += s.send(piece[: min(size, 1 << 20) - sent])
    except TimeoutError:
        pass  # the proxy stopped reading: its buffer for the waiting body is full
    return s


@pytest.mark.parametrize(
    ("size", "reset"),
    [(15, True), (15, False), (64 << 20, True), (64 << 20, False)],
    ids=["small-rst", "small-fin", "large-rst", "large-fin"],
)
def test_a_post_queued_for_a_full_pool_is_never_sent_once_its_client_hangs_up(
    stack: tuple[Proxy, Path], echo: Echo, size: int, reset: bool
) -> None:
    """A small body sits in aiohttp's buffer and the hang-up is read at once; past the buffer
    (the large upload) nothing reads the connection while the request waits, and the hang-up,
    a FIN behind unread body bytes included, is found by polling it."""
    proxy, audit = stack
    occupant, queued = str(uuid.uuid4()), str(uuid.uuid4())
    holder = _hold(proxy.port, "/patient", occupant)
    assert wait_for(lambda: _stub(echo, "count", occupant) == 1, 5), "the pool never filled"
    poster = _upload(proxy.port, queued, size)
    # The POST waits for the one connection, which the occupant holds: max_connections bounds
    # what is in flight.
    assert wait_for(lambda: _gauge(proxy, "edge_upstream_waiting", "patient") == 1, 5)
    assert _gauge(proxy, "edge_upstream_in_flight", "patient") == 1
    started = time.monotonic()
    if reset:
        _hang_up(poster)
    else:
        poster.close()
    row = _row(audit, queued)
    assert (row["status_code"], row["error_message"]) == (499, "client_closed_request")
    assert time.monotonic() - started < PATIENT_WAIT_S / 2, "the wait was not cut short"
    assert _gauge(proxy, "edge_upstream_waiting", "patient") == 0
    # Free the pool; a request sent after it gets the connection and is answered. The slots are
    # handed out in order, so had the POST still been queued it would have been sent first.
    _hang_up(holder)
    after = str(uuid.uuid4())
    r = raw_request(
        proxy.port,
        f"GET /patient/after HTTP/1.1\r\nHost: {HOST}\r\nX-Request-Id: {after}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert r.status == 200
    assert _stub(echo, "count", queued) == 0, "the departed client's POST reached the upstream"


def test_an_upstream_request_in_progress_is_aborted_when_its_client_leaves(
    stack: tuple[Proxy, Path], echo: Echo
) -> None:
    proxy, audit = stack
    rid = str(uuid.uuid4())
    client = _hold(proxy.port, "/patient", rid, seconds=30)
    assert wait_for(lambda: _stub(echo, "count", rid) == 1, 5)
    assert not _stub(echo, "closed", rid)
    client.close()  # FIN: a client that gave up politely
    assert wait_for(lambda: _stub(echo, "closed", rid), 5), "the upstream request went on"
    row = _row(audit, rid)
    assert (row["status_code"], row["error_message"]) == (499, "client_closed_request")
    assert wait_for(lambda: _gauge(proxy, "edge_upstream_in_flight", "patient") == 0, 5)


def test_a_pool_full_past_connect_timeout_answers_upstream_busy(
    stack: tuple[Proxy, Path], echo: Echo
) -> None:
    proxy, audit = stack
    occupant, refused = str(uuid.uuid4()), str(uuid.uuid4())
    before = metric(proxy.admin_port, "edge_upstream_errors_total")
    holder = _hold(proxy.port, "/busy", occupant)
    try:
        assert wait_for(lambda: _stub(echo, "count", occupant) == 1, 5)
        started = time.monotonic()
        r = raw_request(
            proxy.port,
            f"POST /busy/renders HTTP/1.1\r\nHost: {HOST}\r\nX-Request-Id: {refused}\r\n"
            "Content-Length: 2\r\nConnection: close\r\n\r\n{}".encode(),
        )
        waited = time.monotonic() - started
    finally:
        _hang_up(holder)
    assert r.status == 503 and r.header("Retry-After") == "1"
    assert r.header("Content-Type") == "application/json"
    assert json.loads(r.body)["error"]["code"] == "upstream_busy"
    assert BUSY_WAIT_S * 0.9 <= waited < BUSY_WAIT_S + 2
    assert _stub(echo, "count", refused) == 0, "the upstream was contacted"
    row = _row(audit, refused)
    assert (row["status_code"], row["error_message"]) == (503, "upstream_busy")
    assert metric(proxy.admin_port, "edge_upstream_errors_total") == before + 1
