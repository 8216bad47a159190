"""What the upstream is told about the client (CONTRACT §7, §10), against real processes: the
``X-Forwarded-Proto``/``-Host`` of a trusted front believed and anyone else's replaced, and the
W3C ``traceparent`` continued with the proxy's own span id, or passed through unchanged when
the SDK is disabled. Peers are told apart by source address: 127.0.0.1 is the trusted front,
127.0.0.2 any other client."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
