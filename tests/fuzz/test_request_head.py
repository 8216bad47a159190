"""Fuzz target for the request-head path (issue 9 item 4), hypothesis-driven.

Two layers, one generator (``heads.heads``: methods, targets with dot-segments, ``%2e``,
absolute-form and garbage bytes, Host variants, field names and values with odd bytes,
Content-Length / Transfer-Encoding combinations):

- the proxy's pure head functions (``core.framing``, ``core.hosts``, ``core.paths``,
  ``core.forwarding``, ``core.apikeys``, ``core.cors``, ``core.routes``) on the head decoded as
  aiohttp decodes it: each returns a well-formed result or raises its documented error type;
- a real proxy process in front of the echo upstream, over raw sockets: every answer is valid
  HTTP, every proxy-made 4xx/5xx is the contract's JSON, never a 500; what reaches the upstream
  is clean (no raw key, no hop-by-hop or spoofed field, one framing, a resolved path, no
  ``api_key`` route without a key); the process survives and logs no traceback.

The seed corpus (``corpus/*.txt``, format in ``heads.Seed``) is replayed through both layers
on every run; a failing fuzz example is printed in that format, ready to be kept as a seed.
The raw-socket fuzz is bounded twice: ``RAW_EXAMPLES`` heads and ``RAW_BUDGET_S`` seconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, settings

from tests.faults.support import start_quiet_echo
from tests.fuzz.heads import (
    ECHO_SPECIAL,
    Head,
    check_answer,
    check_pure,
    dump_seed,
    exchange,
    heads,
    load_seed,
    parse_head,
    seeds,
)
from tests.procs import (
    DEMO_KEY,
    DEMO_TEST_KEY,
    Echo,
    Proxy,
    start_proxy,
    stop,
    write_config,
)

# A longer hunt: FUZZ_EXAMPLES=5000 FUZZ_BUDGET_S=600 .venv/bin/pytest tests/fuzz
RAW_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
RAW_BUDGET_S = float(os.environ.get("FUZZ_BUDGET_S", "20"))
HEADER_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Echo]:
    e = start_quiet_echo(tmp_path_factory.mktemp("echo") / "echo.log")
    yield e
    stop(e.proc)


@pytest.fixture(scope="module")
def proxy(echo: Echo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    config = write_config(
        tmp_path_factory.mktemp("fuzz") / "edge.toml",
        server={
            "trusted_proxies": ["127.0.0.1/32"],
            "header_timeout_s": HEADER_TIMEOUT_S,
            "max_body_bytes": 1024,
        },
        upstreams={"render-api": {"urls": [echo.url], "read_timeout_s": 5}},
        routes=[
            {"prefix": "/public", "upstream": "render-api", "auth": "none"},
            {"prefix": "/opt", "upstream": "render-api", "auth": "optional"},
            {"prefix": "/embed/", "upstream": "render-api", "auth": "none", "embed": True},
            {
                "prefix": "/v1/renders",
                "upstream": "render-api",
                "auth": "api_key",
                "scopes": {"GET": "renders:read", "HEAD": "renders:read", "POST": "renders:create"},
            },
        ],
    )
    p = start_proxy(config)
    yield p
    stop(p.proc)


def _log(proxy: Proxy) -> str:
    assert proxy.log is not None
    return proxy.log.read_text(errors="replace")


def _send(proxy: Proxy, data: bytes) -> None:
    head_only = data.startswith(b"HEAD ")  # llhttp's method ends at the first space
    answer = exchange(proxy.port, data, head_only=head_only)
    check_answer(answer, head_only=head_only)
    if b"\r\n\r\n" in data and not data.startswith(b"PRI "):
        # A complete head is answered at once: 408 means it was never handled (aiohttp once
        # lost absolute-form requests with an IDNA-invalid host that way). PRI is the HTTP/2
        # preface, which llhttp reads on to its "SM\r\n\r\n": not complete without it.
        assert answer is not None and answer.status != 408, "a complete head timed out"
    assert proxy.proc.poll() is None, "the proxy died"


# --------------------------------------------------------------------------- pure functions


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads())
def test_pure_head_functions_return_or_raise_their_own_errors(head: Head) -> None:
    parsed = parse_head(head.encode())
    if parsed is not None:
        check_pure(parsed)


def test_the_generator_never_asks_the_echo_to_misbehave() -> None:
    """The echo upstream sleeps, resets or streams on some path names: the generator must not
    produce them, or the fuzz would measure the echo, not the proxy."""
    from tests.fuzz.heads import _SEGMENTS

    assert not any(word in segment for word in ECHO_SPECIAL for segment in _SEGMENTS)


# --------------------------------------------------------------------------- seed corpus


@pytest.mark.parametrize("path", seeds(), ids=lambda p: p.stem)
def test_seed_corpus_replays(path: Path, proxy: Proxy) -> None:
    seed = load_seed(path)
    parsed = parse_head(seed.data)
    if parsed is not None:
        check_pure(parsed)
    head_only = seed.data.startswith(b"HEAD ")
    answer = exchange(proxy.port, seed.data, head_only=head_only)
    check_answer(answer, head_only=head_only)
    assert answer is not None
    if seed.status is not None:
        assert answer.status == seed.status, (answer.status, answer.body[:300])
    if seed.code is not None:
        import json

        assert json.loads(answer.body)["error"]["code"] == seed.code
    assert proxy.proc.poll() is None


def test_the_corpus_holds_the_smuggling_cases() -> None:
    names = {p.stem for p in seeds()}
    assert len(names) >= 60
    for required in (
        "smuggle-content-length-and-chunked",
        "smuggle-two-content-lengths",
        "smuggle-chunk-size-0x",
        "smuggle-obs-fold",
        "smuggle-duplicate-host",
        "path-public-dotdot-v1-renders",
        "path-encoded-dotdot-above-root",
    ):
        assert required in names


def test_corpus_format_round_trips() -> None:
    for path in seeds():
        seed = load_seed(path)
        again = dump_seed(seed.data)
        assert load_seed_text(again) == seed.data, path.name


def load_seed_text(text: str) -> bytes:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    try:
        return load_seed(Path(f.name)).data
    finally:
        Path(f.name).unlink()


# --------------------------------------------------------------------------- raw sockets

_budget = {"end": 0.0, "failed": False, "sent": 0}


@settings(
    max_examples=RAW_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(head=heads())
def test_fuzzed_heads_through_a_real_proxy(head: Head, proxy: Proxy) -> None:
    if not _budget["end"]:
        _budget["end"] = time.monotonic() + RAW_BUDGET_S
    if time.monotonic() > _budget["end"] and not _budget["failed"]:
        return  # out of time: the remaining examples are not sent
    data = head.encode()
    note("as a corpus file:\n" + dump_seed(data))
    try:
        _send(proxy, data)
    except BaseException:
        _budget["failed"] = True  # shrinking must not be cut short by the budget
        raise
    _budget["sent"] += 1


def test_the_proxy_survived_and_logged_no_traceback_nor_key(proxy: Proxy) -> None:
    """Runs after the fuzz (tests of a module run in order): the process is alive, serves a
    plain request, and its log has no traceback, no unhandled error and no raw key."""
    if not _budget["sent"]:
        pytest.skip("checks what the fuzz left behind: run it with the module")
    assert _budget["sent"] >= 50, f"only {_budget['sent']} fuzzed heads were sent"
    assert proxy.proc.poll() is None
    _send(proxy, b"GET /public/x HTTP/1.1\r\nHost: videos.acme.test\r\n\r\n")
    time.sleep(0.5)  # the access log and the log queue flush every 200 ms
    log = _log(proxy)
    assert "Traceback" not in log
    assert "unhandled error" not in log
    assert DEMO_KEY not in log and DEMO_TEST_KEY not in log
    print(f"{_budget['sent']} fuzzed heads sent")
