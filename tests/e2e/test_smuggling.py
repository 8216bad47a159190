"""Hostile HTTP/1.1 through a real proxy process, with raw sockets (issue 9 items 1 and 3).

Request smuggling: every ambiguous or malformed framing is answered 400 with the contract's
JSON (CONTRACT §8), the connection is closed, and the upstream never sees the request (the echo
upstream counts requests by ``X-Request-Id``). Resource limits: the head deadline, header count
and size (431), the connection cap, the upstream's response head; the C-parser start-up check.

Waits are deadlines (socket timeouts, polling with an end), never sleeps used as
synchronisation; the only sleeps pace a deliberately slow client.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import (
    DEMO_KEY,
    ROOT,
    Echo,
    Proxy,
    RawResponse,
    start_proxy,
    stop,
    write_config,
)

HOST = "videos.acme.test"
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0


def _config(path: Path, echo_url: str, **server: object) -> Path:
    return write_config(
        path,
        server={"trusted_proxies": ["127.0.0.1/32"], **server},
        upstreams={"render-api": {"urls": [echo_url], "read_timeout_s": 5}},
        routes=[{"prefix": "/public", "upstream": "render-api", "auth": "none"}],
    )


@pytest.fixture(scope="module")
def proxy(echo: Echo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    config = _config(
        tmp_path_factory.mktemp("smuggling") / "edge.toml",
        echo.url,
        header_timeout_s=HEADER_TIMEOUT_S,
        body_timeout_s=BODY_TIMEOUT_S,
    )
    p = start_proxy(config)
    yield p
    stop(p.proc)


# --------------------------------------------------------------------------- raw HTTP helpers


def _connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _read_response(s: socket.socket) -> RawResponse | None:
    """One response from ``s`` (Content-Length or chunked), or None if the server closed
    without one. Bounded by the socket's timeout."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None if not raw else _parse(raw)
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    response = _parse(head + b"\r\n\r\n")
    length = response.header("Content-Length")
    chunked = "chunked" in (response.header("Transfer-Encoding") or "").lower()
    while True:
        if length is not None and len(body) >= int(length):
            break
        if chunked and body.endswith(b"0\r\n\r\n"):
            break
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    if chunked:
        decoded, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2 :]
        body = decoded
    response.body = body
    return response


def _parse(raw: bytes) -> RawResponse:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [(k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in lines[1:])]
    return RawResponse(int(lines[0].split(" ")[1]), headers, body)


def _closed(s: socket.socket, within_s: float = 3.0) -> bool:
    """True when the server closes ``s`` (FIN or RST) within the deadline, sending nothing."""
    s.settimeout(within_s)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _exchange(port: int, data: bytes) -> tuple[RawResponse | None, bool]:
    """Send ``data`` on a fresh connection: the response, and whether the server closed."""
    with _connect(port) as s:
        s.sendall(data)
        response = _read_response(s)
        return response, _closed(s)


def _count(echo: Echo, rid: str) -> int:
    with urllib.request.urlopen(f"{echo.url}/__count/{rid}", timeout=5) as r:
        n: int = json.load(r)["count"]
        return n


def _json_error(r: RawResponse) -> dict[str, str]:
    assert (r.header("Content-Type") or "").startswith("application/json"), r.headers
    error: dict[str, str] = json.loads(r.body)["error"]
    assert set(error) == {"code", "message", "request_id"}
    assert r.header("X-Request-Id") == error["request_id"]
    assert str(uuid.UUID(error["request_id"])) == error["request_id"]
    return error


def _request(
    *fields: str,
    body: bytes = b"",
    method: str = "POST",
    target: str = "/public/echo",
    version: str = "HTTP/1.1",
    rid: str,
) -> bytes:
    lines = [f"{method} {target} {version}", f"X-Request-Id: {rid}", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --------------------------------------------------------------------------- smuggling

H = f"Host: {HOST}"
CHUNKED_BODY = b"5\r\nhello\r\n0\r\n\r\n"

# name -> (header lines, body, request line version). Every one is refused with 400.
MALFORMED: dict[str, tuple[tuple[str, ...], bytes, str]] = {
    # RFC 9112 §6.3: both framings is an attack signature, whichever comes first.
    "content-length-and-chunked": (
        (H, "Content-Length: 5", "Transfer-Encoding: chunked"),
        CHUNKED_BODY,
        "HTTP/1.1",
    ),
    "chunked-and-content-length": (
        (H, "Transfer-Encoding: chunked", "Content-Length: 5"),
        CHUNKED_BODY,
        "HTTP/1.1",
    ),
    "two-content-lengths": ((H, "Content-Length: 5", "Content-Length: 6"), b"hello!", "HTTP/1.1"),
    "two-equal-content-lengths": (
        (H, "Content-Length: 5", "Content-Length: 5"),
        b"hello",
        "HTTP/1.1",
    ),
    "content-length-list": ((H, "Content-Length: 5, 5"), b"hello", "HTTP/1.1"),
    "content-length-plus-sign": ((H, "Content-Length: +5"), b"hello", "HTTP/1.1"),
    # RFC 9112 §6.1: chunked must be the final coding; the proxy accepts exactly "chunked".
    "chunked-then-identity": (
        (H, "Transfer-Encoding: chunked, identity"),
        CHUNKED_BODY,
        "HTTP/1.1",
    ),
    "identity-then-chunked": (
        (H, "Transfer-Encoding: identity, chunked"),
        CHUNKED_BODY,
        "HTTP/1.1",
    ),
    "gzip-then-chunked": ((H, "Transfer-Encoding: gzip, chunked"), CHUNKED_BODY, "HTTP/1.1"),
    "chunked-twice": ((H, "Transfer-Encoding: chunked, chunked"), CHUNKED_BODY, "HTTP/1.1"),
    "two-transfer-encoding-lines": (
        (H, "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"),
        CHUNKED_BODY,
        "HTTP/1.1",
    ),
    "xchunked": ((H, "Transfer-Encoding: xchunked"), CHUNKED_BODY, "HTTP/1.1"),
    "unknown-final-coding": ((H, "Transfer-Encoding: gzip"), CHUNKED_BODY, "HTTP/1.1"),
    "chunked-in-http-1.0": ((H, "Transfer-Encoding: chunked"), CHUNKED_BODY, "HTTP/1.0"),
    "transfer-encoding-obs-fold": (
        (H, "Transfer-Encoding:\r\n chunked"),
        CHUNKED_BODY,
        "HTTP/1.1",
    ),
    "transfer-encoding-space-before-colon": (
        (H, "Transfer-Encoding : chunked"),
        CHUNKED_BODY,
        "HTTP/1.1",
    ),
    # Chunk sizes are 1*HEXDIG (RFC 9112 §7.1): no sign, no prefix, no underscore, no overflow.
    "chunk-size-underscore": ((H, "Transfer-Encoding: chunked"), b"0_2e\r\n\r\n", "HTTP/1.1"),
    "chunk-size-plus": (
        (H, "Transfer-Encoding: chunked"),
        b"+5\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.1",
    ),
    "chunk-size-0x": ((H, "Transfer-Encoding: chunked"), b"0x5\r\nhello\r\n0\r\n\r\n", "HTTP/1.1"),
    "chunk-size-negative": (
        (H, "Transfer-Encoding: chunked"),
        b"-1\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.1",
    ),
    "chunk-size-overflow": (
        (H, "Transfer-Encoding: chunked"),
        b"FFFFFFFFFFFFFFFFF1\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.1",
    ),
    "chunk-size-bare-lf": ((H, "Transfer-Encoding: chunked"), b"5\nhello\n0\n\n", "HTTP/1.1"),
    # Field values: no NUL, CR, LF or other CTL (RFC 9110 §5.5); no obs-fold (RFC 9112 §5.2).
    "nul-in-value": ((H, "X-Note: a\x00b"), b"", "HTTP/1.1"),
    "cr-in-value": ((H, "X-Note: a\rb"), b"", "HTTP/1.1"),
    "lf-in-value": ((H, "X-Note: a\nb"), b"", "HTTP/1.1"),
    "ctl-in-value": ((H, "X-Note: a\x01b"), b"", "HTTP/1.1"),
    "obs-fold": ((H, "X-Note: a", " folded"), b"", "HTTP/1.1"),
    "obs-fold-tab": ((H, "X-Note: a", "\tfolded"), b"", "HTTP/1.1"),
    # RFC 9112 §5.1: no whitespace between field name and colon.
    "space-before-colon": ((H, "X-Note : a"), b"", "HTTP/1.1"),
    "tab-before-colon": ((H, "X-Note\t: a"), b"", "HTTP/1.1"),
    # RFC 9112 §3.2: exactly one Host.
    "duplicate-host": ((H, "Host: other.test"), b"", "HTTP/1.1"),
    "missing-host": ((), b"", "HTTP/1.1"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_framing_is_400_json_closed_and_never_forwarded(
    name: str, proxy: Proxy, echo: Echo
) -> None:
    fields, body, version = MALFORMED[name]
    rid = str(uuid.uuid4())
    response, closed = _exchange(proxy.port, _request(*fields, body=body, version=version, rid=rid))
    assert response is not None, "the server closed without an answer"
    assert response.status == 400, (response.status, response.body)
    assert _json_error(response)["code"] == "bad_request"
    assert closed, "the connection must not be reused after a malformed request"
    assert _count(echo, rid) == 0


def test_absolute_form_target_disagreeing_with_host_is_400(proxy: Proxy, echo: Echo) -> None:
    rid = str(uuid.uuid4())
    data = _request(H, method="GET", target="http://other.test/public/echo", rid=rid)
    response, closed = _exchange(proxy.port, data)
    assert response is not None and response.status == 400
    error = _json_error(response)
    assert error["code"] == "bad_request" and error["request_id"] == rid
    assert closed
    assert _count(echo, rid) == 0


def test_bad_chunk_after_the_head_is_400_and_closed(proxy: Proxy, echo: Echo) -> None:
    """The head is forwarded before the body arrives; a chunk size that breaks later must
    still end in a 400 and a closed connection, not a request waiting forever for its body
    (aiohttp alone leaves it waiting). The upstream then holds a truncated chunked body."""
    rid = str(uuid.uuid4())
    upstream_errors_before = _upstream_errors(proxy)
    with _connect(proxy.port) as s:
        s.sendall(_request(H, "Transfer-Encoding: chunked", body=b"5\r\nhello\r\n", rid=rid))
        end = time.monotonic() + 5
        while _count(echo, rid) == 0:  # poll until the head has been forwarded
            assert time.monotonic() < end, "the head never reached the upstream"
            time.sleep(0.01)
        s.sendall(b"0x5\r\nhello\r\n0\r\n\r\n")
        started = time.monotonic()
        response = _read_response(s)
        assert response is not None and response.status == 400
        error = _json_error(response)
        assert error["code"] == "bad_request" and error["request_id"] == rid
        assert _closed(s)
        assert time.monotonic() - started < 3
    # The proxy is fine afterwards.
    ok, _ = _exchange(
        proxy.port, _request(H, "Content-Length: 2", body=b"ok", rid=str(uuid.uuid4()))
    )
    assert ok is not None and ok.status == 200
    # The client's broken body is not counted against the upstream, and it is recorded as the
    # 400 it got (the connection is closed to refuse it, which fails the body like a hang-up:
    # not a 499).
    assert _upstream_errors(proxy) == upstream_errors_before
    line = _access_line(proxy, rid)
    assert (line["status"], line["error"]) == (400, "bad_request")


def _access_line(proxy: Proxy, rid: str) -> dict[str, object]:
    """The proxy's access-log line for ``rid`` (written in batches: polled, with a deadline)."""
    assert proxy.log is not None
    end = time.monotonic() + 5
    while True:
        for text in proxy.log.read_text(errors="replace").splitlines():
            if text.startswith("{") and rid in text:
                entry: dict[str, object] = json.loads(text)
                if entry.get("request_id") == rid:
                    return entry
        assert time.monotonic() < end, f"no access-log line for {rid}"
        time.sleep(0.05)


def _metric(proxy: Proxy, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of ``name`` on ``proxy``'s /metrics, by their sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{proxy.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def _upstream_errors(proxy: Proxy) -> float:
    return sum(_metric(proxy, "edge_upstream_errors_total").values())


def test_refusals_before_the_application_are_counted_by_reason(proxy: Proxy) -> None:
    """They never reach the pipeline (so not edge_requests_total); a flood of malformed heads
    must still show on a dashboard."""

    def counts() -> dict[str, float]:
        samples = _metric(proxy, "edge_connection_refusals_total")
        return {dict(labels)["reason"]: value for labels, value in samples.items()}

    before = counts()
    assert _exchange(proxy.port, b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")[0] is not None
    assert _exchange(proxy.port, _request(H, "X-Big: " + "b" * 8200, method="GET", rid="x"))[0]
    with _connect(proxy.port) as s:  # a partial head: 408 at the head deadline
        s.sendall(b"GET /public/x HTTP/1.1\r\n")
        assert _read_response(s) is not None
    with _connect(proxy.port) as s:  # nothing at all: closed at the head deadline
        assert _closed(s, within_s=HEADER_TIMEOUT_S + 3)
    after = counts()
    moved = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert moved["bad_request"] == 1 and moved["request_header_fields_too_large"] == 1
    assert moved["request_timeout"] == 1 and moved["no_request"] >= 1


@pytest.mark.parametrize("coding", ["chunked", "Chunked ", "CHUNKED", "\tchunked"])
def test_chunked_request_reaches_upstream_with_exactly_one_framing(
    coding: str, proxy: Proxy, echo: Echo
) -> None:
    # Transfer-coding names are case-insensitive and OWS is not part of the value (RFC 9112 §7,
    # RFC 9110 §5.5): these are all "chunked". The proxy re-frames the body itself.
    rid = str(uuid.uuid4())
    body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    response, _ = _exchange(
        proxy.port,
        _request(H, f"Transfer-Encoding:{coding}", "Connection: close", body=body, rid=rid),
    )
    assert response is not None and response.status == 200, response
    echoed = json.loads(response.body)
    names = [k.lower() for k, _ in echoed["headers"]]
    assert names.count("transfer-encoding") == 1 and "content-length" not in names
    assert [v for k, v in echoed["headers"] if k.lower() == "transfer-encoding"] == ["chunked"]
    assert echoed["body_bytes"] == len(b"hello world")
    assert _count(echo, rid) == 1


def test_content_length_request_reaches_upstream_with_only_content_length(
    proxy: Proxy, echo: Echo
) -> None:
    rid = str(uuid.uuid4())
    response, _ = _exchange(
        proxy.port,
        _request(H, "Content-Length: 5", "Connection: close", body=b"hello", rid=rid),
    )
    assert response is not None and response.status == 200
    echoed = json.loads(response.body)
    names = [k.lower() for k, _ in echoed["headers"]]
    assert names.count("content-length") == 1 and "transfer-encoding" not in names
    assert echoed["body_bytes"] == 5


# --------------------------------------------------------------------------- head limits


def test_too_many_headers_is_431_json(proxy: Proxy, echo: Echo) -> None:
    # Every field line counts, Host and X-Request-Id included: 100 are allowed, 101 are not.
    fields = [H, *(f"X-Filler-{i}: {i}" for i in range(97))]
    rid = str(uuid.uuid4())
    ok, _ = _exchange(proxy.port, _request(*fields, "Connection: close", method="GET", rid=rid))
    assert ok is not None and ok.status == 200
    rid = str(uuid.uuid4())
    response, closed = _exchange(
        proxy.port, _request(*fields, "X-One: 1", "X-Too-Many: 1", method="GET", rid=rid)
    )
    assert response is not None and response.status == 431
    assert _json_error(response)["code"] == "request_header_fields_too_large"
    assert closed and _count(echo, rid) == 0


def test_too_long_request_line_is_431_json(proxy: Proxy, echo: Echo) -> None:
    rid = str(uuid.uuid4())
    target = "/public/" + "a" * 8200
    response, closed = _exchange(proxy.port, _request(H, method="GET", target=target, rid=rid))
    assert response is not None and response.status == 431
    assert _json_error(response)["code"] == "request_header_fields_too_large"
    assert closed and _count(echo, rid) == 0


def test_too_long_header_field_is_431_json(proxy: Proxy, echo: Echo) -> None:
    rid = str(uuid.uuid4())
    response, closed = _exchange(
        proxy.port, _request(H, "X-Big: " + "b" * 8200, method="GET", rid=rid)
    )
    assert response is not None and response.status == 431
    assert _json_error(response)["code"] == "request_header_fields_too_large"
    assert closed and _count(echo, rid) == 0


def test_garbage_gets_json_400(proxy: Proxy) -> None:
    response, closed = _exchange(
        proxy.port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"
    )
    assert response is not None and response.status == 400
    assert _json_error(response)["code"] == "bad_request"
    assert closed


# --------------------------------------------------------------------------- head deadline


def test_head_dripped_byte_by_byte_is_cut_at_header_timeout(proxy: Proxy) -> None:
    head = _request(H, *(f"X-Slow-{i}: {'z' * 20}" for i in range(50)), method="GET", rid="x")
    with _connect(proxy.port) as s:
        s.settimeout(0.05)
        started = time.monotonic()
        received = b""
        closed_at = None
        for byte in head:  # 10 bytes a second: the head would take minutes
            try:
                s.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_at = time.monotonic()
                break
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                chunk = None
            except ConnectionResetError:
                chunk = b""
            if chunk:
                received += chunk
            elif chunk == b"":
                closed_at = time.monotonic()
                break
            assert time.monotonic() - started < HEADER_TIMEOUT_S + 4, "never cut"
            time.sleep(0.05)
    assert closed_at is not None
    assert HEADER_TIMEOUT_S - 0.1 <= closed_at - started < HEADER_TIMEOUT_S + 2
    response = _parse(received)
    assert response.status == 408
    assert _json_error(response)["code"] == "request_timeout"


def test_connection_that_sends_nothing_is_closed_at_header_timeout(proxy: Proxy) -> None:
    with _connect(proxy.port) as s:
        started = time.monotonic()
        assert _closed(s, within_s=HEADER_TIMEOUT_S + 3)
        assert time.monotonic() - started >= HEADER_TIMEOUT_S - 0.1


def test_idle_keep_alive_is_not_cut_by_the_head_deadline(proxy: Proxy) -> None:
    """The head clock starts at a request's first byte: between requests the (longer)
    keep-alive timeout applies, as with nginx's client_header_timeout."""
    with _connect(proxy.port) as s:
        s.sendall(_request(H, method="GET", rid=str(uuid.uuid4())))
        first = _read_response(s)
        assert first is not None and first.status == 200
        assert not _closed(s, within_s=HEADER_TIMEOUT_S + 0.5)  # a bounded wait past it
        s.settimeout(5)
        s.sendall(_request(H, "Connection: close", method="GET", rid=str(uuid.uuid4())))
        second = _read_response(s)
        assert second is not None and second.status == 200


def test_slow_body_is_not_cut_by_the_head_deadline(proxy: Proxy) -> None:
    rid = str(uuid.uuid4())
    with _connect(proxy.port) as s:
        s.sendall(_request(H, "Transfer-Encoding: chunked", "Connection: close", rid=rid))
        end = time.monotonic() + HEADER_TIMEOUT_S * 2
        sent = 0
        while time.monotonic() < end:  # the body takes twice the head deadline
            s.sendall(b"4\r\nbody\r\n")
            sent += 4
            time.sleep(0.2)
        s.sendall(b"0\r\n\r\n")
        response = _read_response(s)
    assert response is not None and response.status == 200
    assert json.loads(response.body)["body_bytes"] == sent


@pytest.mark.parametrize(
    ("framing", "first_part"),
    [("Content-Length: 100", b"x" * 10), ("Transfer-Encoding: chunked", b"a\r\n0123456789\r\n")],
)
def test_a_body_that_stalls_is_answered_408_and_the_connection_closed(
    proxy: Proxy, echo: Echo, framing: str, first_part: bytes
) -> None:
    """nginx's client_body_timeout: a client that stops mid-upload must not hold its connection
    (and an upstream one) for ever. The upstream got the request once and a cut-off body (the
    proxy aborts that connection), and it is never sent again."""
    rid = str(uuid.uuid4())
    with _connect(proxy.port, timeout=BODY_TIMEOUT_S + 5) as s:
        started = time.monotonic()
        s.sendall(_request(H, framing, rid=rid) + first_part)
        response = _read_response(s)
        waited = time.monotonic() - started
        assert response is not None and response.status == 408
        assert _json_error(response)["code"] == "request_timeout"
        assert response.header("Connection") == "close"
        assert _closed(s)
    assert BODY_TIMEOUT_S - 0.1 <= waited < BODY_TIMEOUT_S + 3
    with urllib.request.urlopen(f"{echo.url}/__count/{rid}", timeout=5) as r:
        assert json.load(r)["count"] == 1


def test_a_body_with_pauses_shorter_than_the_timeout_is_served(proxy: Proxy) -> None:
    body = b"0123456789" * 3
    with _connect(proxy.port) as s:
        s.sendall(_request(H, f"Content-Length: {len(body)}", "Connection: close", rid="x"))
        for i in range(0, len(body), 10):  # three pieces, each after half the timeout
            time.sleep(BODY_TIMEOUT_S / 2)
            s.sendall(body[i : i + 10])
        response = _read_response(s)
    assert response is not None and response.status == 200
    assert json.loads(response.body)["body_bytes"] == len(body)


def test_100_continue_is_sent_only_when_the_body_is_read(proxy: Proxy) -> None:
    """Not before the pipeline ran: a client is never invited to upload a body the proxy then
    refuses. Once the request passed every stage, the forwarder asks for the body."""
    with _connect(proxy.port) as s:
        s.sendall(_request(H, "Expect: 100-continue", "Content-Length: 5", rid="x"))
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            chunk = s.recv(1)
            assert chunk, "closed before 100 Continue"
            interim += chunk
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        response = _read_response(s)
    assert response is not None and response.status == 200
    assert json.loads(response.body)["body_bytes"] == 5


def test_a_request_refused_before_its_body_gets_no_100_continue_and_a_closed_connection(
    proxy: Proxy,
) -> None:
    """RFC 9110 §10.1.1: the client may still send the body after its own timeout, so the
    connection cannot carry another request after the final answer."""
    data = _request(H, "Expect: 100-continue", "Content-Length: 5", target="/nowhere", rid="x")
    with _connect(proxy.port) as s:
        s.sendall(data)
        response = _read_response(s)  # the first thing back is the final answer
        assert response is not None and response.status == 404
        assert _json_error(response)["code"] == "no_route"
        assert response.header("Connection") == "close"
        assert _closed(s)


def test_expect_with_an_empty_body_keeps_the_connection(proxy: Proxy) -> None:
    """No body, nothing to invite: the answer is final and the connection carries on."""
    with _connect(proxy.port) as s:
        s.sendall(_request(H, "Expect: 100-continue", "Content-Length: 0", rid="x"))
        first = _read_response(s)
        assert first is not None and first.status == 200
        assert first.header("Connection") != "close"
        s.sendall(_request(H, "Content-Length: 0", "Connection: close", rid="y"))
        second = _read_response(s)
        assert second is not None and second.status == 200


def test_a_client_that_sends_its_body_without_waiting_still_gets_the_refusal(
    proxy: Proxy,
) -> None:
    """RFC 9110 lets a client send the body without waiting for 100 Continue: the refusal must
    reach it whole (aiohttp's lingering read, not an immediate close that could reset it)."""
    data = _request(
        H,
        "Expect: 100-continue",
        "Content-Length: 5",
        target="/nowhere",
        body=b"hello",
        rid="x",
    )
    with _connect(proxy.port) as s:
        s.sendall(data)
        response = _read_response(s)
        assert response is not None and response.status == 404
        assert _json_error(response)["code"] == "no_route"
        assert response.header("Connection") == "close"


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/0.9"])  # 1.2, 3.0: llhttp says 400
def test_a_version_other_than_http_1_is_505_in_http_1_1(proxy: Proxy, version: str) -> None:
    """llhttp accepts these request lines and aiohttp would answer in kind ("HTTP/2.0 200
    OK"). RFC 9110 §15.6.6: 505, in a status line the client can read, and the connection
    closes (the rest of the message is in a framing this server does not speak)."""
    with _connect(proxy.port) as s:
        s.sendall(_request(H, method="GET", target="/public/x", version=version, rid="x"))
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 505 "), raw[:80]
    response = _parse(raw)
    assert _json_error(response)["code"] == "http_version_not_supported"
    assert response.header("Connection") == "close"


def test_head_sent_slowly_within_the_deadline_is_served(proxy: Proxy) -> None:
    data = _request(H, "Connection: close", method="GET", rid=str(uuid.uuid4()))
    with _connect(proxy.port) as s:
        for part in (data[:10], data[10:30], data[30:]):
            s.sendall(part)
            time.sleep(HEADER_TIMEOUT_S / 5)
        response = _read_response(s)
    assert response is not None and response.status == 200


# --------------------------------------------------------------------------- connection cap


def test_connections_over_the_limit_are_closed_at_once(echo: Echo, tmp_path: Path) -> None:
    limit = 3
    proxy = start_proxy(_config(tmp_path / "edge.toml", echo.url, max_connections=limit))
    held: list[socket.socket] = []
    try:
        # start_proxy's own probe connections may still be closing: wait until all are gone.
        end = time.monotonic() + 5
        while len(held) < limit:
            s = _connect(proxy.port)
            s.sendall(_request(H, method="GET", rid=str(uuid.uuid4())))
            response = _read_response(s)
            if response is None:  # refused: an earlier connection is not released yet
                s.close()
                assert time.monotonic() < end, "the limit never freed up"
                continue
            assert response.status == 200
            held.append(s)
        # One more: accepted by the kernel, closed by the proxy straight away.
        extra = _connect(proxy.port)
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            extra.sendall(_request(H, method="GET", rid=str(uuid.uuid4())))
        assert _read_response(extra) is None
        assert time.monotonic() - started < 2
        extra.close()
        # The admitted connections keep working.
        for s in held:
            s.sendall(_request(H, method="GET", rid=str(uuid.uuid4())))
            response = _read_response(s)
            assert response is not None and response.status == 200
        # A freed slot is usable again.
        held.pop().close()
        end = time.monotonic() + 5
        while True:
            with _connect(proxy.port) as s:
                s.sendall(_request(H, "Connection: close", method="GET", rid=str(uuid.uuid4())))
                response = _read_response(s)
            if response is not None:
                assert response.status == 200
                break
            assert time.monotonic() < end, "the freed slot never came back"
    finally:
        for s in held:
            s.close()
        stop(proxy.proc)


# --------------------------------------------------------------------------- logs and parser


def test_parser_errors_never_log_the_offending_bytes(echo: Echo, tmp_path: Path) -> None:
    """aiohttp logs a parse error with a traceback quoting the bad line; a broken
    Authorization line would put an API key in the log (CONTRACT §5)."""
    proxy = start_proxy(_config(tmp_path / "edge.toml", echo.url))
    try:
        for line in (f"Authorization: Bearer {DEMO_KEY}\x01", f"X-API-Key: {DEMO_KEY}\x00"):
            response, _ = _exchange(proxy.port, _request(H, line, method="GET", rid="r"))
            assert response is not None and response.status == 400
    finally:
        output = proxy.output()
    assert DEMO_KEY not in output
    assert "Traceback" not in output


def test_serve_refuses_the_pure_python_parser_unless_allowed(echo: Echo, tmp_path: Path) -> None:
    env = {**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    config = _config(tmp_path / "edge.toml", echo.url)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(config),
            "--listen",
            "127.0.0.1:0",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "allow_python_parser" in lines[0], result.stderr
    # Allowed explicitly, it starts and serves.
    allowed = _config(tmp_path / "allowed.toml", echo.url, allow_python_parser=True)
    proxy = start_proxy(allowed, env={"AIOHTTP_NO_EXTENSIONS": "1"})
    try:
        response, _ = _exchange(
            proxy.port, _request(H, "Connection: close", method="GET", rid=str(uuid.uuid4()))
        )
        assert response is not None and response.status == 200
    finally:
        stop(proxy.proc)


# --------------------------------------------------------------------------- upstream limits


def _oversized_upstream(field_bytes: int) -> tuple[socket.socket, threading.Thread]:
    """A raw upstream that answers every request with one header field of ``field_bytes``."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nX-Huge: "
                + b"h" * field_bytes
                + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_upstream_response_head_over_the_limit_is_502(echo: Echo, tmp_path: Path) -> None:
    listener, thread = _oversized_upstream(64 * 1024)
    port = listener.getsockname()[1]
    proxy = start_proxy(_config(tmp_path / "edge.toml", f"http://127.0.0.1:{port}"))
    try:
        response, _ = _exchange(
            proxy.port, _request(H, "Connection: close", method="GET", rid=str(uuid.uuid4()))
        )
        assert response is not None and response.status == 502
        assert _json_error(response)["code"] == "upstream_unavailable"
    finally:
        stop(proxy.proc)
        listener.close()
        thread.join(5)
