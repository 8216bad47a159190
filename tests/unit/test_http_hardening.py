"""proxy.core.framing and the parser-error mapping of proxy.connection (issue 9, CONTRACT §8).

The mapping is checked against aiohttp's real C parser, so an aiohttp upgrade that changes the
exceptions or messages it relies on fails here, not in production.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError
from aiohttp.http_parser import HttpRequestParser

from proxy import connection
from proxy.connection import ConnectionGate, parser_error, raw_error
from proxy.core.framing import framing_problem
from proxy.cparser import c_parser_in_use
from proxy.errors import BadRequest
from proxy.settings import ConfigError, parse_settings

MINIMAL: dict[str, Any] = {
    "upstreams": {"render-api": {"urls": ["http://127.0.0.1:9001"]}},
    "routes": [{"prefix": "/v1/renders", "upstream": "render-api"}],
}


@pytest.mark.parametrize(
    ("version", "values", "refused"),
    [
        ((1, 1), [], False),
        ((1, 0), [], False),
        ((1, 1), ["chunked"], False),
        ((1, 1), ["Chunked"], False),
        ((1, 1), ["CHUNKED "], False),
        ((1, 1), ["\tchunked"], False),
        ((1, 1), ["gzip, chunked"], True),
        ((1, 1), ["identity, chunked"], True),
        ((1, 1), ["chunked, identity"], True),
        ((1, 1), ["chunked, chunked"], True),
        ((1, 1), ["chunked", "chunked"], True),
        ((1, 1), ["gzip", "chunked"], True),
        ((1, 1), ["xchunked"], True),
        ((1, 1), ["chunked;q=1"], True),
        ((1, 1), [""], True),
        ((1, 1), ["identity"], True),
        ((1, 0), ["chunked"], True),
        ((0, 9), ["chunked"], True),
    ],
)
def test_framing_problem(version: tuple[int, int], values: list[str], refused: bool) -> None:
    assert (framing_problem(version, values) is not None) is refused


def test_the_c_parser_is_in_use() -> None:
    # The test environment is the production one: if this fails, so does `serve`.
    assert c_parser_in_use()


GATE = ConnectionGate(
    header_timeout_s=10, max_connections=10, max_headers=5, max_line_size=100, max_field_size=100
)


def _parse_error(data: bytes) -> BaseException:
    async def feed() -> BaseException:
        parser = HttpRequestParser(
            mock.Mock(),
            asyncio.get_running_loop(),
            2**16,
            max_line_size=GATE.max_line_size,
            max_field_size=GATE.max_field_size,
            max_headers=GATE.max_headers,
        )
        with pytest.raises(HttpProcessingError) as caught:
            parser.feed_data(data)
        return caught.value

    return asyncio.run(feed())


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (
            b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
            431,
            "request_header_fields_too_large",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: " + b"a" * 200 + b"\r\n\r\n",
            431,
            "request_header_fields_too_large",
        ),
        (
            b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(6)) + b"\r\n",
            431,
            "request_header_fields_too_large",
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n", 400, "bad_request"),
        (b"\x16\x03\x01\x00\x05hello\r\n\r\n", 400, "bad_request"),
    ],
)
def test_parser_errors_map_to_contract_codes(data: bytes, status: int, code: str) -> None:
    error = parser_error(400, _parse_error(data), GATE)
    assert (error.status, error.code) == (status, code)


def test_messages_never_quote_the_request_bytes() -> None:
    secret = b"fr_live_SecretSecretSecretSecretSecret00"
    exc = _parse_error(
        b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer " + secret + b"\x01\r\n\r\n"
    )
    assert secret.decode() not in parser_error(400, exc, GATE).message
    # The pure-Python parser quotes the bytes on the first line: cut as well.
    py = BadHttpMessage("Invalid HTTP header: b'Bearer " + secret.decode() + "'")
    assert secret.decode() not in parser_error(400, py, GATE).message
    assert parser_error(400, py, GATE).message == "Invalid HTTP header"


def test_other_statuses_are_internal_errors() -> None:
    assert parser_error(500, RuntimeError("boom"), GATE).code == "internal_error"
    assert parser_error(500, RuntimeError("boom"), GATE).message == "internal error"


def test_raw_error_is_a_complete_closing_response() -> None:
    raw = raw_error(BadRequest("nope"), "0c6c5f2e-0000-4000-8000-000000000000")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 400 Bad Request"
    assert b"Connection: close" in lines and b"Content-Type: application/json" in lines
    assert f"Content-Length: {len(body)}".encode() in lines
    assert body.startswith(b'{"error":{"code":"bad_request"')


def test_connection_gate_counts_and_refuses() -> None:
    gate = ConnectionGate(
        header_timeout_s=1, max_connections=2, max_headers=1, max_line_size=1, max_field_size=1
    )
    assert gate.admit(0.0) and gate.admit(0.0)
    assert not gate.admit(0.0) and gate.refusals == {"connection_limit": 1}
    gate.release()
    assert gate.admit(1.0) and gate.open == 2


def test_server_limits_are_settings() -> None:
    s = parse_settings(MINIMAL, {}, Path("edge.toml")).server
    assert (s.header_timeout_s, s.max_headers, s.max_connections) == (10.0, 100, 10_000)
    assert not s.allow_python_parser
    data = {
        **MINIMAL,
        "server": {"header_timeout_s": 2.5, "max_headers": 50, "max_connections": 7},
    }
    s = parse_settings(data, {}, Path("edge.toml")).server
    assert (s.header_timeout_s, s.max_headers, s.max_connections) == (2.5, 50, 7)
    with pytest.raises(ConfigError, match=r"server\.max_connections"):
        parse_settings({**MINIMAL, "server": {"max_connections": 0}}, {}, Path("edge.toml"))


def test_settings_refuse_the_python_parser_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("proxy.settings.c_parser_in_use", lambda: False)
    with pytest.raises(ConfigError, match=r"^server\.allow_python_parser: .*C HTTP parser"):
        parse_settings(MINIMAL, {}, Path("edge.toml"))
    allowed = {**MINIMAL, "server": {"allow_python_parser": True}}
    assert parse_settings(allowed, {}, Path("edge.toml")).server.allow_python_parser


def test_too_many_headers_text_is_aiohttps() -> None:
    assert str(_parse_error(b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * 6 + b"\r\n").message) == (
        connection.TOO_MANY_HEADERS
    )


class _Waiting:
    """A connection as the gate's sweep sees it: a head deadline, and what expiry does."""

    def __init__(self, deadline: float) -> None:
        self.head_deadline = deadline
        self.expired = False

    def head_expired(self) -> None:
        self.expired = True


async def test_the_head_deadline_sweep_expires_only_passed_deadlines() -> None:
    gate = ConnectionGate(
        header_timeout_s=2, max_connections=5, max_headers=1, max_line_size=1, max_field_size=1
    )
    now = asyncio.get_running_loop().time()
    late, due, idle = _Waiting(now - 0.5), _Waiting(now + 60), _Waiting(float("inf"))
    for c in (late, due, idle):
        gate.watch(c)  # type: ignore[arg-type]
    gate._expire()  # what the sweep's timer runs
    assert (late.expired, due.expired, idle.expired) == (True, False, False)
    assert gate._sweep is not None  # open connections: the sweep goes on
    for c in (late, due, idle):
        gate.forget(c)  # type: ignore[arg-type]
    gate._expire()
    assert gate._sweep is None  # none open: no timer at all


class _Failing(_Waiting):
    def head_expired(self) -> None:
        raise RuntimeError("transport gone")


async def test_a_failing_expiry_spares_no_other_connection_and_the_sweep_goes_on() -> None:
    gate = ConnectionGate(
        header_timeout_s=2, max_connections=5, max_headers=1, max_line_size=1, max_field_size=1
    )
    now = asyncio.get_running_loop().time()
    broken, late = _Failing(now - 1), _Waiting(now - 1)
    for c in (broken, late):
        gate.watch(c)  # type: ignore[arg-type]
    gate._expire()
    assert late.expired
    assert gate._sweep is not None  # the next sweep is scheduled all the same
    assert broken.head_deadline == float("inf")  # not expired again at every sweep
    gate._sweep.cancel()
