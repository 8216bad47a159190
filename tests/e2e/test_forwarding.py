"""Forwarding through a real proxy process to a real echo upstream (CONTRACT §7, §8)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator

import aiohttp
import psutil
import pytest

from tests.e2e.conftest import MAX_BODY
from tests.procs import ACME_ID, DEMO_KEY, Echo, Proxy, raw_request

HOST = "videos.acme.test"


def _get(path: str, *headers: str, host: str = HOST) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *headers, "Connection: close", "", ""]
    return "\r\n".join(lines).encode()


def _echoed(body: bytes) -> dict[str, object]:
    data: dict[str, object] = json.loads(body)
    return data


def _header_names(echoed: dict[str, object]) -> set[str]:
    return {k.lower() for k, _ in echoed["headers"]}  # type: ignore[attr-defined]


def _header(echoed: dict[str, object], name: str) -> list[str]:
    return [v for k, v in echoed["headers"] if k.lower() == name.lower()]  # type: ignore[attr-defined]


def _error(body: bytes) -> dict[str, str]:
    err: dict[str, str] = json.loads(body)["error"]
    return err


def test_hop_by_hop_and_spoofed_headers_never_reach_upstream(proxy: Proxy) -> None:
    r = raw_request(
        proxy.port,
        _get(
            "/public/echo?a=1&b=%20",
            "Connection: X-Secret-Hop, keep-alive",
            "X-Secret-Hop: must-not-pass",
            "Keep-Alive: timeout=5",
            "TE: trailers",
            "Trailer: X-Sum",
            "Upgrade: h2c",
            "Proxy-Authorization: Basic Zm9vOmJhcg==",
            "Proxy-Connection: keep-alive",
            "X-FlatRender-Tenant-Id: 11111111-1111-1111-1111-111111111111",
            "x-flatrender-api-key-id: evil",
            "Forwarded: for=1.2.3.4",
            "X-Custom: kept",
        ),
    )
    assert r.status == 200
    echoed = _echoed(r.body)
    names = _header_names(echoed)
    for dropped in (
        "x-secret-hop",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "forwarded",
    ):
        assert dropped not in names
    assert _header(echoed, "X-FlatRender-Tenant-Id") == [ACME_ID]  # the proxy's own, not spoof
    assert "x-flatrender-api-key-id" not in names  # no key on this route: none added either
    assert _header(echoed, "X-Custom") == ["kept"]
    assert echoed["path"] == "/public/echo" and echoed["query"] == "a=1&b=%20"
    assert _header(echoed, "X-Forwarded-Host") == [HOST]
    assert _header(echoed, "X-Forwarded-Proto") == ["http"]


def test_hop_by_hop_response_headers_are_stripped(proxy: Proxy) -> None:
    r = raw_request(proxy.port, _get("/public/hop"))
    assert r.status == 200 and r.body == b"hop"
    names = {k.lower() for k, _ in r.headers}
    assert {
        "x-internal-token",
        "keep-alive",
        "proxy-authenticate",
        "trailer",
        "x-flatrender-internal",
    }.isdisjoint(names)
    assert r.header("X-Kept") == "yes"
    assert r.header("X-Request-Id")


def test_forwarded_for_from_trusted_and_untrusted_peers(proxy: Proxy) -> None:
    # 127.0.0.1 is trusted: its X-Forwarded-For is kept and the peer appended.
    trusted = _echoed(
        raw_request(proxy.port, _get("/public/x", "X-Forwarded-For: 203.0.113.9")).body
    )
    assert _header(trusted, "X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"]
    # 127.0.0.2 is not: whatever it claims is discarded.
    untrusted = _echoed(
        raw_request(
            proxy.port, _get("/public/x", "X-Forwarded-For: 203.0.113.9"), source="127.0.0.2"
        ).body
    )
    assert _header(untrusted, "X-Forwarded-For") == ["127.0.0.2"]


def test_request_id_kept_when_uuid_and_replaced_otherwise(proxy: Proxy) -> None:
    rid = str(uuid.uuid4())
    r = raw_request(proxy.port, _get("/public/x", f"X-Request-Id: {rid.upper()}"))
    assert r.header("X-Request-Id") == rid
    assert _header(_echoed(r.body), "X-Request-Id") == [rid]
    r = raw_request(proxy.port, _get("/public/x", "X-Request-Id: not-a-uuid; DROP TABLE"))
    fresh = r.header("X-Request-Id")
    assert fresh and str(uuid.UUID(fresh)) == fresh
    assert _header(_echoed(r.body), "X-Request-Id") == [fresh]


def test_unknown_path_is_404_no_route_json(proxy: Proxy) -> None:
    r = raw_request(proxy.port, _get("/nowhere"))
    assert r.status == 404
    assert (
        r.header(
            "Content-Type",
        )
        == "application/json"
    )
    err = _error(r.body)
    assert err["code"] == "no_route" and err["request_id"] == r.header("X-Request-Id")


def test_dot_segments_are_resolved_before_routing(proxy: Proxy) -> None:
    # /public is open, /v1/renders needs a key: climbing out of /public must not skip auth.
    r = raw_request(proxy.port, _get("/public/../v1/renders"))
    assert r.status == 401 and _error(r.body)["code"] == "missing_api_key"
    r = raw_request(proxy.port, _get("/public/%2e%2e/v1/renders"))
    assert r.status == 401
    r = raw_request(
        proxy.port,
        _get(
            "/v1/../public/./x",
        ),
    )
    assert r.status == 200 and _echoed(r.body)["path"] == "/public/x"
    r = raw_request(proxy.port, _get("/public/../../etc/passwd"))
    assert r.status == 400 and _error(r.body)["code"] == "bad_request"


def test_upstream_refused_is_502_json(proxy: Proxy) -> None:
    r = raw_request(proxy.port, _get("/dead/x"))
    assert r.status == 502
    assert r.header("Content-Type") == "application/json"
    assert _error(r.body)["code"] == "upstream_unavailable"


def test_slow_upstream_is_504_within_read_timeout(proxy: Proxy) -> None:
    started = time.monotonic()
    r = raw_request(proxy.port, _get("/slowup/slow?seconds=5"))
    elapsed = time.monotonic() - started
    assert r.status == 504 and _error(r.body)["code"] == "upstream_timeout"
    assert elapsed < 1 + 1  # read_timeout_s of that upstream is 1 s


def test_round_robin_skips_a_refusing_url(proxy: Proxy, echo: Echo) -> None:
    for _ in range(6):
        r = raw_request(proxy.port, _get("/rr/x"))
        assert r.status == 200
        assert _header(_echoed(r.body), "Host") == [f"127.0.0.1:{echo.port}"]


async def _count(echo: Echo, rid: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(f"{echo.url}/__count/{rid}") as r:
        n: int = (await r.json())["count"]
        return n


async def test_post_reaches_upstream_exactly_once(proxy: Proxy, echo: Echo) -> None:
    body = os.urandom(300_000)
    async with aiohttp.ClientSession() as s:
        rid = str(uuid.uuid4())
        async with s.post(
            f"{proxy.url}/public/create", data=body, headers={"Host": HOST, "X-Request-Id": rid}
        ) as r:
            assert r.status == 200
            echoed = await r.json()
        assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert await _count(echo, rid) == 1
        # A POST the upstream drops is not retried (it may have been acted on) ...
        rid = str(uuid.uuid4())
        async with s.post(
            f"{proxy.url}/public/reset", data=b"x", headers={"Host": HOST, "X-Request-Id": rid}
        ) as r:
            assert r.status == 502
        assert await _count(echo, rid) == 1
        # ... while an idempotent GET may be retried once (a stale pooled connection).
        rid = str(uuid.uuid4())
        async with s.get(
            f"{proxy.url}/public/reset", headers={"Host": HOST, "X-Request-Id": rid}
        ) as r:
            assert r.status == 502
        assert await _count(echo, rid) in (1, 2)


async def _chunks(total: int, size: int = 65536) -> AsyncIterator[bytes]:
    block = os.urandom(size)
    left = total
    while left > 0:
        yield block[: min(size, left)]
        left -= size


async def test_request_bodies_stream_with_their_framing(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as s:
        # Chunked in, chunked out: no Content-Length is invented.
        async with s.put(
            f"{proxy.url}/public/upload", data=_chunks(3 * 1024 * 1024), headers={"Host": HOST}
        ) as r:
            echoed = await r.json()
        assert echoed["body_bytes"] == 3 * 1024 * 1024
        assert _header(echoed, "Transfer-Encoding") == ["chunked"]
        # A declared length is passed on as it is.
        async with s.put(
            f"{proxy.url}/public/upload", data=b"y" * 1000, headers={"Host": HOST}
        ) as r:
            echoed = await r.json()
        assert _header(echoed, "Content-Length") == ["1000"]


async def test_body_over_limit_is_413_and_upstream_not_contacted(proxy: Proxy, echo: Echo) -> None:
    rid = str(uuid.uuid4())
    head = (
        f"POST /public/big HTTP/1.1\r\nHost: {HOST}\r\nX-Request-Id: {rid}\r\n"
        f"Content-Length: {MAX_BODY + 1}\r\nConnection: close\r\n\r\n"
    ).encode()
    r = raw_request(proxy.port, head)
    assert r.status == 413 and _error(r.body)["code"] == "payload_too_large"
    assert await _count(echo, rid) == 0


async def test_chunked_body_over_limit_is_refused(proxy: Proxy, echo: Echo) -> None:
    rid = str(uuid.uuid4())
    async with aiohttp.ClientSession() as s:
        try:
            async with s.post(
                f"{proxy.url}/public/big",
                data=_chunks(MAX_BODY + 65536),
                headers={"Host": HOST, "X-Request-Id": rid},
            ) as r:
                assert r.status == 413
        except aiohttp.ClientError:
            pass  # the proxy may close while the client is still sending: also a refusal
    # The upstream may have seen the start of the upload, never a complete request.
    async with aiohttp.ClientSession() as s, s.get(f"{echo.url}/__count/{rid}") as r:
        assert (await r.json())["count"] <= 1


async def test_large_streamed_response_keeps_memory_flat(proxy: Proxy) -> None:
    total = 200 * 1024 * 1024
    process = psutil.Process(proxy.proc.pid)
    idle = process.memory_info().rss
    peak = idle
    received = 0
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{proxy.url}/public/stream?bytes={total}", headers={"Host": HOST}) as r,
    ):
        assert r.status == 200
        async for chunk in r.content.iter_chunked(1 << 20):
            received += len(chunk)
            peak = max(peak, process.memory_info().rss)
    assert received == total
    assert peak - idle < 50 * 1024 * 1024, f"RSS grew by {(peak - idle) >> 20} MiB"


async def test_content_length_response_passes_through(proxy: Proxy) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{proxy.url}/public/stream?bytes=100000&length=1", headers={"Host": HOST}) as r,
    ):
        assert r.headers["Content-Length"] == "100000"
        assert len(await r.read()) == 100000


async def test_websocket_echo_passes_through(proxy: Proxy) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(
            f"{proxy.url}/public/ws", headers={"Host": HOST}, protocols=("render.v1",)
        ) as ws,
    ):
        assert ws.protocol == "render.v1"
        await ws.send_str("hello")
        assert (await ws.receive_str(timeout=5)) == "echo:hello"
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive_bytes(timeout=5)) == b"\x00\x01"


async def test_api_key_is_verified_and_never_forwarded(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(
            f"{proxy.url}/v1/renders/1",
            headers={"Host": HOST, "Authorization": f"Bearer {DEMO_KEY}"},
        ) as r:
            assert r.status == 200
            echoed = await r.json()
        assert DEMO_KEY not in json.dumps(echoed)
        assert _header(echoed, "X-FlatRender-Key-Environment") == ["live"]
        async with s.get(
            f"{proxy.url}/v1/renders/1", headers={"Host": HOST, "X-API-Key": DEMO_KEY[:-1] + "Z"}
        ) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"


async def test_concurrent_requests_all_answered(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> int:
            async with s.get(f"{proxy.url}/public/c{i}", headers={"Host": HOST}) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one(i) for i in range(200)))
    assert statuses == [200] * 200


@pytest.mark.parametrize(
    ("host", "status", "code"),
    [("nobody.example", 404, "unknown_host"), ("bad host!", 400, "bad_request")],
)
def test_host_errors(proxy: Proxy, host: str, status: int, code: str) -> None:
    r = raw_request(proxy.port, _get("/public/x", host=host))
    assert r.status == status and _error(r.body)["code"] == code


@pytest.mark.parametrize("chunked", [False, True])
def test_upstream_dying_mid_body_cuts_the_client_connection(proxy: Proxy, chunked: bool) -> None:
    """A truncated body must never pass for a whole one: no final chunk, no full length."""
    import socket

    target = "/public/truncate?chunked=1" if chunked else "/public/truncate"
    failures_before = _body_failures(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(_get(target))
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    if chunked:
        assert not body.endswith(b"0\r\n\r\n")
    else:
        assert b"content-length: 1048576" in head.lower()
        assert len(body) < 1 << 20
    # Counted as the upstream's failure even though the client got a 200 head.
    assert _body_failures(proxy) == failures_before + 1


def _body_failures(proxy: Proxy) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin_port}/metrics") as r:
        text = r.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "edge_upstream_errors_total" and s.labels.get("kind") == "body_failed"
    )
