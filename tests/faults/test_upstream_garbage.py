"""An upstream that answers garbage (issue 9 item 5), against a real proxy process.

A raw-socket upstream in this file answers each request according to the last segment of its
path: bytes that are not HTTP, a broken status line, a close in the middle of the head, a
response with ambiguous framing, a body that breaks after a good head. For each, what the
client sees (502 ``upstream_unavailable`` as the contract's JSON while no byte of the answer has
been sent; a cut connection, never a complete-looking body, once the head has gone out), what
is logged (one access-log line with the status, no traceback), what is counted
(``edge_upstream_errors_total``), that a POST reaches the upstream exactly once (no retry of a
request that may have been processed), and that the proxy then serves normally.

Slow and resetting upstreams are covered in ``tests/e2e/test_forwarding.py``
(``test_slow_upstream_is_504_within_read_timeout``, ``test_upstream_refused_is_502_json``,
``test_upstream_dying_mid_body_cuts_the_client_connection``), an oversized response head in
``tests/e2e/test_smuggling.py::test_upstream_response_head_over_the_limit_is_502``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.support import audit_rows, metric, start_audited_proxy, wait_for
from tests.procs import Proxy, raw_request, stop

HOST = "videos.acme.test"
READ_TIMEOUT_S = 2

# mode -> the bytes answered; None: close without a byte.
GARBAGE: dict[str, bytes | None] = {
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n",
    "binary": bytes(range(256)) * 4,
    "http09": b"hello, this is a body without any status line\n",
    "broken-status-line": b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n",
    "unknown-version": b"HTTP/9.9 200 OK\r\nContent-Length: 0\r\n\r\n",
    "status-out-of-range": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "close-mid-status-line": b"HTTP/1.1 20",
    "close-mid-head": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Le",
    "close-without-a-byte": None,
    "nul-in-field": b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "content-length-and-chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    ),
    "two-content-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
    "negative-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "cr-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok",
    "tab-before-colon": b"HTTP/1.1 200 OK\r\nX-A\t: 1\r\nContent-Length: 2\r\n\r\nok",
    "odd-name": b"HTTP/1.1 200 OK\r\nX(A): 1\r\nContent-Length: 2\r\n\r\nok",
    "te-space-before-colon": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding : chunked\r\nContent-Length: 2\r\n\r\nok"
    ),
}
# mode -> what aiohttp's client parses leniently (it answers 200 "ok"): the client must get one
# unambiguous framing and only well-formed fields.
LENIENT: dict[str, bytes] = {
    # "Content-Length " (with the space) reached aiohttp as a field of its own; the proxy sent
    # it on beside its own Transfer-Encoding: chunked (fixed: non-token names are dropped).
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    # RFC 9112 §5.2: a proxy replaces obs-fold with SP before forwarding.
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
}
# mode -> a good head, then a body that breaks: the client must see a cut, not a whole body.
BROKEN_BODY: dict[str, bytes] = {
    "bad-chunk-size": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nmore\r\n"
    ),
    "short-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nonly this",
    "chunked-then-close": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
}
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


class RawUpstream:
    """A threaded raw-socket server: reads one request head (and its Content-Length body),
    answers by mode, closes after anything but ``ok``. Counts requests per mode."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.hits: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._connection, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _connection(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        buf = b""
        with conn, contextlib.suppress(OSError):
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                length = next(
                    (
                        int(v)
                        for k, _, v in (h.partition(b":") for h in lines[1:])
                        if k.strip().lower() == b"content-length"
                    ),
                    0,
                )
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                mode = lines[0].split(b" ")[1].split(b"?")[0].rsplit(b"/", 1)[-1].decode()
                self.hits[mode] += 1
                if mode in BROKEN_BODY:
                    # The head first, alone: the proxy relays it before the body breaks.
                    head, _, body = BROKEN_BODY[mode].partition(b"\r\n\r\n")
                    conn.sendall(head + b"\r\n\r\n")
                    time.sleep(0.2)
                    conn.sendall(body)
                    time.sleep(0.05)
                    return
                answer = GARBAGE.get(mode, LENIENT.get(mode, OK))
                if answer is not None:
                    conn.sendall(answer)
                if mode in GARBAGE or mode in LENIENT:
                    return  # close: the answer is all there is

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._accept.join(5)
        for t in self._threads:
            t.join(5)


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    u = RawUpstream()
    yield u
    u.close()


@pytest.fixture(scope="module")
def stack(
    upstream: RawUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Proxy, Path]]:
    proxy, audit = start_audited_proxy(
        tmp_path_factory.mktemp("garbage"),
        upstreams={
            "raw": {
                "urls": [f"http://127.0.0.1:{upstream.port}"],
                "read_timeout_s": READ_TIMEOUT_S,
            },
        },
        routes=[{"prefix": "/public", "upstream": "raw", "auth": "none", "audit": True}],
    )
    yield proxy, audit
    stop(proxy.proc)


def _request(method: str, mode: str, rid: str) -> bytes:
    body = "x" * 5 if method == "POST" else ""
    length = f"Content-Length: {len(body)}\r\n" if method == "POST" else ""
    return (
        f"{method} /public/{mode} HTTP/1.1\r\nHost: {HOST}\r\nX-Request-Id: {rid}\r\n"
        f"{length}\r\n{body}"
    ).encode()


def _access_line(proxy: Proxy, rid: str) -> dict[str, object] | None:
    assert proxy.log is not None
    for line in proxy.log.read_text(errors="replace").splitlines():
        if line.startswith("{") and rid in line:
            entry: dict[str, object] = json.loads(line)
            return entry
    return None


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("mode", list(GARBAGE))
def test_garbage_answer_is_502_json(
    mode: str, method: str, stack: tuple[Proxy, Path], upstream: RawUpstream
) -> None:
    proxy, audit = stack
    errors_before = metric(proxy.admin_port, "edge_upstream_errors_total")
    hits_before = upstream.hits[mode]
    rid = str(uuid.uuid4())
    started = time.monotonic()
    r = raw_request(proxy.port, _request(method, mode, rid), timeout=10)
    # What the client sees: at once, the contract's JSON, with its request id.
    assert time.monotonic() - started < 2
    assert r.status == 502, (r.status, r.body[:200])
    assert r.header("Content-Type") == "application/json"
    error = json.loads(r.body)["error"]
    assert error["code"] == "upstream_unavailable" and error["request_id"] == rid
    assert r.header("X-Request-Id") == rid
    # A POST may have been processed: it is never sent twice. A GET may be retried once, by
    # aiohttp, when a pooled keep-alive connection turns out dead.
    sent = upstream.hits[mode] - hits_before
    assert sent == 1 if method == "POST" else 1 <= sent <= 2, sent
    # Counted, logged as one access-log line, audited once; never a traceback.
    assert metric(proxy.admin_port, "edge_upstream_errors_total") == errors_before + 1
    assert wait_for(lambda: _access_line(proxy, rid) is not None, 3)
    line = _access_line(proxy, rid)
    assert line is not None and line["status"] == 502 and line["error"] == "upstream_unavailable"
    assert wait_for(lambda: any(row["request_id"] == rid for row in audit_rows(audit)), 3)
    rows = [row for row in audit_rows(audit) if row["request_id"] == rid]
    assert len(rows) == 1 and rows[0]["status_code"] == 502
    # And the next request to the same upstream is served.
    ok = raw_request(proxy.port, _request(method, "ok", str(uuid.uuid4())))
    assert ok.status == 200 and ok.body == b"ok"


@pytest.mark.parametrize("mode", list(LENIENT))
def test_leniently_parsed_answer_goes_out_with_one_framing(
    mode: str, stack: tuple[Proxy, Path]
) -> None:
    proxy, _ = stack
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(
            _request("GET", mode, str(uuid.uuid4())).replace(
                b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"
            )
        )
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, _ = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 200")
    names = [line.partition(b":")[0] for line in lines[1:]]
    for name in names:  # every field name a token: nothing a lenient reader could misread
        assert name and name == name.strip() and not any(c in name for c in b" \t()"), names
    framing = [n.lower() for n in names if n.lower() in (b"content-length", b"transfer-encoding")]
    assert len(framing) == 1, names
    response = raw_request(proxy.port, _request("GET", mode, str(uuid.uuid4())))
    assert response.status == 200 and response.body == b"ok"
    if mode == "obs-fold":
        assert response.header("X-A") == "a b"


@pytest.mark.parametrize("mode", list(BROKEN_BODY))
def test_body_breaking_after_a_good_head_cuts_the_client(
    mode: str, stack: tuple[Proxy, Path]
) -> None:
    """The head (200) has gone out when the body breaks: the only honest signal left is to cut
    the client's connection, so the truncated body can never pass for a whole one. A bad chunk
    size used to leave the client waiting forever (aiohttp's C parser neither ends nor fails
    the body, and drops its read timer): now it is cut within ``read_timeout_s``."""
    proxy, _ = stack
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(_request("GET", mode, str(uuid.uuid4())))
        raw = b""
        end = time.monotonic() + READ_TIMEOUT_S + 3
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                raw += chunk
                assert time.monotonic() < end, "the proxy kept the connection open"
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    if b"transfer-encoding: chunked" in head.lower():
        assert not body.endswith(b"0\r\n\r\n"), "a cut body was given a final chunk"
    else:
        length = next(
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        assert len(body) < length, "a cut body was given its full length"


def test_the_proxy_logged_no_traceback(stack: tuple[Proxy, Path]) -> None:
    proxy, _ = stack
    assert proxy.proc.poll() is None
    log = proxy.output()
    assert "Traceback" not in log
    assert "unhandled error" not in log
