"""Clients that vanish mid-download and mid-upload (issue 9 item 5), against real processes.

After every round of disconnects the proxy must hold what it held before: no client socket
left (not even in CLOSE_WAIT), no more connections to the upstream than its warm keep-alive
pool, no more file descriptors; and the echo upstream no more connections from the proxy. The
counts must not grow over repeated rounds. aiohttp exposes no task count and the proxy's
/metrics has none, so leaked request tasks are caught two other ways: each would hold a client
or an upstream socket (counted above), and a request still in flight would hold SIGTERM for
``shutdown_timeout_s`` (the last test: the proxy exits at once). Nothing is lost: every
request, however it ended, has exactly one audit row.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.support import (
    Holdings,
    audit_rows,
    holdings,
    settle,
    start_audited_proxy,
    start_quiet_echo,
    wait_for,
)
from tests.procs import Echo, Proxy, raw_request, stop

HOST = "videos.acme.test"
SHUTDOWN_TIMEOUT_S = 20
ROUNDS = 3


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Echo]:
    e = start_quiet_echo(tmp_path_factory.mktemp("echo") / "echo.log")
    yield e
    stop(e.proc)


@pytest.fixture(scope="module")
def stack(echo: Echo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proxy, Path]]:
    proxy, audit = start_audited_proxy(
        tmp_path_factory.mktemp("disconnect"),
        upstreams={"render-api": {"urls": [echo.url], "read_timeout_s": 5}},
        routes=[{"prefix": "/public", "upstream": "render-api", "auth": "none", "audit": True}],
        shutdown_timeout_s=SHUTDOWN_TIMEOUT_S,
    )
    yield proxy, audit
    stop(proxy.proc)


@pytest.fixture(scope="module")
def baseline(stack: tuple[Proxy, Path], echo: Echo) -> Holdings:
    """What the proxy holds at rest after a few ordinary requests: its warm pool."""
    proxy, _ = stack
    for _ in range(3):
        assert (
            raw_request(proxy.port, _get("/public/warm", str(uuid.uuid4()), close=True)).status
            == 200
        )
    return settle(lambda: _holdings(proxy, echo), lambda h: h.clients == 0)


def _holdings(proxy: Proxy, echo: Echo) -> Holdings:
    return holdings(proxy.proc.pid, proxy.port, echo.port)


def _echo_clients(echo: Echo) -> int:
    return holdings(echo.proc.pid, echo.port, 0).clients


def _get(path: str, rid: str, *, close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nX-Request-Id: {rid}\r\n{extra}\r\n".encode()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _vanish(s: socket.socket, reset: bool) -> None:
    """Close like a client that crashed (RST: SO_LINGER 0) or gave up politely (FIN)."""
    if reset:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _download_and_vanish(port: int, rid: str, *, reset: bool) -> None:
    """Ask for a 1 GiB body, read the head and 256 KiB of it, stall, and go."""
    s = _connect(port)
    s.sendall(_get("/public/stream?bytes=1073741824", rid))
    received = b""
    while len(received) < 256 * 1024:
        chunk = s.recv(65536)
        assert chunk, "the proxy closed the download first"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    # Stop reading for a moment: the socket buffers fill and the proxy waits for them to drain,
    # which is where aiohttp reports the loss as a bare ConnectionError (once an unhandled 500).
    time.sleep(0.1)
    _vanish(s, reset)


def _upload_and_vanish(port: int, rid: str, echo: Echo, *, chunked: bool, slow: bool) -> None:
    """Start a 64 MiB upload, send part of it (quickly, or dripping for half a second once the
    upstream has the head), and go."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {64 << 20}"
    s = _connect(port)
    s.sendall(
        f"POST /public/upload HTTP/1.1\r\nHost: {HOST}\r\nX-Request-Id: {rid}\r\n"
        f"{framing}\r\n\r\n".encode()
    )
    piece = b"u" * 16384
    data = (b"4000\r\n" + piece + b"\r\n") if chunked else piece
    for _ in range(8):
        s.sendall(data)
    assert wait_for(lambda: _seen(echo, rid) == 1, 5), "the upload never reached the upstream"
    if slow:
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            s.sendall(data)
            time.sleep(0.05)
    _vanish(s, reset=not slow)


def _seen(echo: Echo, rid: str) -> int:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{echo.url}/__count/{rid}", timeout=5) as r:
        n: int = json.load(r)["count"]
        return n


def _settled(proxy: Proxy, echo: Echo, baseline: Holdings) -> Holdings:
    return settle(
        lambda: _holdings(proxy, echo),
        lambda h: h.clients == 0 and h.upstream <= baseline.upstream and h.fds <= baseline.fds,
    )


def _rounds(
    stack: tuple[Proxy, Path], echo: Echo, baseline: Holdings, one: object, per_round: int = 4
) -> list[str]:
    """``ROUNDS`` rounds of ``per_round`` disconnects; after each, everything is back to the
    baseline (and so cannot grow from round to round). Returns the request ids."""
    proxy, _ = stack
    rids: list[str] = []
    readings = []
    for _ in range(ROUNDS):
        for i in range(per_round):
            rid = str(uuid.uuid4())
            rids.append(rid)
            one(proxy.port, rid, i)  # type: ignore[operator]
        now = _settled(proxy, echo, baseline)
        readings.append(now)
        assert now.clients == 0, f"client sockets left behind: {now}"
        assert now.upstream <= baseline.upstream, f"upstream connections grew: {now} > {baseline}"
        assert now.fds <= baseline.fds, f"file descriptors grew: {now} > {baseline}"
        assert wait_for(lambda: _echo_clients(echo) <= baseline.upstream, 10), (
            "the upstream still holds connections the proxy gave up"
        )
    assert proxy.proc.poll() is None
    # The proxy serves as before.
    assert (
        raw_request(proxy.port, _get("/public/after", str(uuid.uuid4()), close=True)).status == 200
    )
    return rids


def _one_row_each(audit: Path, rids: list[str]) -> list[dict[str, object]]:
    wanted = set(rids)

    def rows() -> list[dict[str, object]]:
        return [r for r in audit_rows(audit) if r["request_id"] in wanted]

    assert wait_for(lambda: len(rows()) >= len(rids), 5), "audit rows are missing"
    found = rows()
    assert sorted(str(r["request_id"]) for r in found) == sorted(rids), "lost or doubled rows"
    return found


# --------------------------------------------------------------------------- downloads


@pytest.mark.parametrize("reset", [True, False], ids=["rst", "fin"])
def test_client_vanishing_mid_download_leaks_nothing(
    stack: tuple[Proxy, Path], echo: Echo, baseline: Holdings, reset: bool
) -> None:
    rids = _rounds(
        stack, echo, baseline, lambda port, rid, _i: _download_and_vanish(port, rid, reset=reset)
    )
    # The client left before its answer was complete: CONTRACT §7 records that as 499
    # client_closed_request even though a 200 head had gone out, exactly once.
    rows = _one_row_each(stack[1], rids)
    assert {(r["status_code"], r["error_message"]) for r in rows} == {
        (499, "client_closed_request")
    }


def test_concurrent_downloads_vanishing_together_leak_nothing(
    stack: tuple[Proxy, Path], echo: Echo, baseline: Holdings
) -> None:
    proxy, audit = stack
    rids = [str(uuid.uuid4()) for _ in range(8)]
    sockets = []
    for rid in rids:
        s = _connect(proxy.port)
        s.sendall(_get("/public/stream?bytes=1073741824", rid))
        sockets.append(s)
    for s in sockets:  # all eight are streaming...
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
    for s in sockets:  # ...when their clients all go at once
        _vanish(s, reset=True)
    now = _settled(proxy, echo, baseline)
    assert now.clients == 0 and now.upstream <= baseline.upstream and now.fds <= baseline.fds, (
        now,
        baseline,
    )
    _one_row_each(audit, rids)


# --------------------------------------------------------------------------- uploads


@pytest.mark.parametrize(
    ("chunked", "slow"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["content-length", "chunked", "slow-content-length", "slow-chunked"],
)
def test_client_vanishing_mid_upload_leaks_nothing(
    stack: tuple[Proxy, Path], echo: Echo, baseline: Holdings, chunked: bool, slow: bool
) -> None:
    rids = _rounds(
        stack,
        echo,
        baseline,
        lambda port, rid, _i: _upload_and_vanish(port, rid, echo, chunked=chunked, slow=slow),
        per_round=2 if slow else 4,
    )
    # The upstream saw a cut-off body, never a complete request; the row records the client's
    # hang-up as nginx's 499, not as a request of its that was malformed (400).
    rows = _one_row_each(stack[1], rids)
    assert {(r["status_code"], r["error_message"]) for r in rows} == {
        (499, "client_closed_request")
    }


# --------------------------------------------------------------------------- afterwards


def test_nothing_in_flight_remains_so_sigterm_is_immediate(stack: tuple[Proxy, Path]) -> None:
    """A request task leaked by any disconnect above would still be in flight: the proxy would
    then wait ``shutdown_timeout_s`` for it on SIGTERM. It exits at once, and its log has no
    traceback and no error."""
    proxy, _ = stack
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(Exception):
        proxy.proc.wait(SHUTDOWN_TIMEOUT_S + 5)
    elapsed = time.monotonic() - started
    assert proxy.proc.returncode == 0
    assert elapsed < 5, f"SIGTERM took {elapsed:.1f}s: something was still in flight"
    log = proxy.output()
    assert "Traceback" not in log
    assert " ERROR " not in log, [line for line in log.splitlines() if " ERROR " in line][:5]
