"""proxy.core.forwarding: header hygiene, client address and request id (CONTRACT §7)."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.forwarding import (
    Header,
    IPNetwork,
    client_address,
    connection_named,
    forwarded_origin,
    request_headers_to_forward,
    request_id,
    response_headers_to_return,
    trusted_peer,
)

# RFC 9110 §7.6.1 and CONTRACT §7: removed both ways.
HOP_BY_HOP = [
    "Connection",
    "Keep-Alive",
    "TE",
    "Trailer",
    "Transfer-Encoding",
    "Upgrade",
    "Proxy-Connection",
    "Proxy-Authorization",
    "Proxy-Authenticate",
    "Proxy-Anything-Else",
]
# Set by the proxy itself, so a client must never get to choose them.
SPOOFABLE = [
    "X-FlatRender-Tenant-Id",
    "x-flatrender-tenant-slug",
    "X-FLATRENDER-API-KEY-ID",
    "X-FlatRender-Scopes",
    "X-Flatrender-Key-Environment",
    "X-FlatRender-Whatever",
    "X-Forwarded-For",
    "x-forwarded-proto",
    "X-Forwarded-Host",
    "Forwarded",
    "X-Request-Id",
    "X-Request-ID",
    "X-Api-Key",
    "X-API-KEY",
]
ORDINARY = [
    ("Accept", "application/json"),
    ("Authorization", "Bearer something"),
    ("Cookie", "a=1"),
    ("Content-Type", "application/json"),
    ("User-Agent", "curl/8"),
    ("X-Custom", "1"),
    ("X-Custom", "2"),
    ("Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
]


def _names(headers: list[Header]) -> list[str]:
    return [name.lower() for name, _ in headers]


# --------------------------------------------------------------------------- request headers


@pytest.mark.parametrize("name", HOP_BY_HOP + [n.lower() for n in HOP_BY_HOP] + SPOOFABLE)
def test_request_drops(name: str) -> None:
    headers = [("Accept", "*/*"), (name, "x"), ("X-Custom", "1")]
    assert request_headers_to_forward(headers) == [("Accept", "*/*"), ("X-Custom", "1")]


@pytest.mark.parametrize("name", ["Host", "Content-Length", "Expect"])
def test_request_drops_framing_the_proxy_recomputes(name: str) -> None:
    assert request_headers_to_forward([(name, "1"), ("Accept", "*/*")]) == [("Accept", "*/*")]


def test_request_keeps_order_and_duplicates_of_other_headers() -> None:
    headers = [
        ("Connection", "keep-alive"),
        *ORDINARY,
        ("X-FlatRender-Tenant-Id", "spoofed"),
        ("Cookie", "b=2"),
    ]
    assert request_headers_to_forward(headers) == [*ORDINARY, ("Cookie", "b=2")]


def test_request_keeps_header_name_spelling() -> None:
    headers = [("x-cUsToM", "v"), ("ACCEPT", "*/*")]
    assert request_headers_to_forward(headers) == headers


@pytest.mark.parametrize(
    "connection_values",
    [
        ["X-Secret, X-Other"],
        ["x-secret,x-other"],
        ["  X-SECRET  ,  ,X-Other  "],
        [",X-Secret,,", "x-other"],  # several Connection headers are one list (RFC 9110 §5.3)
        ["X-Secret", "close", "X-Other, keep-alive"],
    ],
)
def test_request_drops_every_header_named_in_connection(connection_values: list[str]) -> None:
    headers = [
        *[("Connection", v) for v in connection_values],
        ("X-Secret", "1"),
        ("x-OTHER", "2"),
        ("X-Kept", "3"),
    ]
    assert request_headers_to_forward(headers) == [("X-Kept", "3")]


def test_connection_named_parses_lists() -> None:
    headers = [("connection", " Foo ,bar,, "), ("CONNECTION", "BAZ"), ("X-Foo", "Connection")]
    assert connection_named(headers) == frozenset({"foo", "bar", "baz"})
    assert connection_named([]) == frozenset()


def test_connection_may_name_an_end_to_end_header() -> None:
    # RFC 9110 §7.6.1: whatever Connection names is hop-by-hop for this message.
    headers = [("Connection", "Authorization"), ("Authorization", "Basic x"), ("Accept", "*")]
    assert request_headers_to_forward(headers) == [("Accept", "*")]


# --------------------------------------------------------------------------- response headers


@pytest.mark.parametrize("name", HOP_BY_HOP + [n.upper() for n in HOP_BY_HOP])
def test_response_drops_hop_by_hop(name: str) -> None:
    headers = [("Content-Type", "text/plain"), (name, "x")]
    assert response_headers_to_return(headers) == [("Content-Type", "text/plain")]


def test_response_drops_internal_namespace_and_content_length() -> None:
    headers = [
        ("X-FlatRender-Debug", "1"),
        ("x-flatrender-tenant-id", "t"),
        ("Content-Length", "10"),
        ("ETag", '"1"'),
    ]
    assert response_headers_to_return(headers) == [("ETag", '"1"')]


def test_response_keeps_order_and_duplicate_set_cookie() -> None:
    headers = [
        ("Set-Cookie", "a=1; Path=/"),
        ("Connection", "X-Hop, close"),
        ("X-Hop", "1"),
        ("Cache-Control", "no-store"),
        ("Set-Cookie", "b=2; Path=/"),
        ("Transfer-Encoding", "chunked"),
        ("Vary", "Accept"),
        ("Vary", "Accept-Encoding"),
    ]
    assert response_headers_to_return(headers) == [
        ("Set-Cookie", "a=1; Path=/"),
        ("Cache-Control", "no-store"),
        ("Set-Cookie", "b=2; Path=/"),
        ("Vary", "Accept"),
        ("Vary", "Accept-Encoding"),
    ]


@pytest.mark.parametrize(
    "name", ["X-Request-Id", "X-Forwarded-For", "Forwarded", "Location", "WWW-Authenticate"]
)
def test_response_keeps_end_to_end_headers_a_request_would_lose(name: str) -> None:
    # The request-side spoof list is not applied to answers (the proxy sets X-Request-Id
    # itself later, replacing the upstream's).
    assert response_headers_to_return([(name, "v")]) == [(name, "v")]


# --------------------------------------------------------------------------- filter properties

_case = st.sampled_from([str.lower, str.upper, str.title, lambda s: s])
_names_st = st.one_of(
    st.builds(lambda n, f: f(n), st.sampled_from(HOP_BY_HOP + SPOOFABLE), _case),
    st.builds(lambda n, f: f(n), st.sampled_from([n for n, _ in ORDINARY]), _case),
    st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True),
    st.from_regex(r"(?i:x-flatrender-|proxy-|x-forwarded-)[a-z0-9-]{0,8}", fullmatch=True),
)
_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)


@st.composite
def _header_lists(draw: st.DrawFn) -> list[Header]:
    headers = draw(st.lists(st.tuples(_names_st, _values), max_size=12))
    # Connection headers that name some of the other headers, in any case and spacing
    for _ in range(draw(st.integers(0, 2))):
        named = draw(st.lists(st.sampled_from([n for n, _ in headers] or ["X-A"]), max_size=3))
        sep = draw(st.sampled_from([",", ", ", " ,  ", ",,"]))
        value = sep.join(draw(_case)(n) for n in named)
        headers.insert(draw(st.integers(0, len(headers))), ("Connection", value))
    return headers


def _must_drop(name: str, headers: list[Header], request: bool) -> bool:
    low = name.lower()
    named = {
        t.strip().lower() for n, v in headers if n.lower() == "connection" for t in v.split(",")
    }
    fixed = {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
    if request:
        fixed |= {
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "forwarded",
            "x-request-id",
            "x-api-key",
        }
    return (
        low in fixed or low in named or low.startswith("proxy-") or low.startswith("x-flatrender-")
    )


def _is_subsequence(sub: list[Header], seq: list[Header]) -> bool:
    it = iter(seq)
    return all(item in it for item in sub)


@settings(max_examples=300, deadline=None)
@given(_header_lists(), st.booleans())
def test_filter_properties(headers: list[Header], request: bool) -> None:
    f = request_headers_to_forward if request else response_headers_to_return
    kept = f(headers)
    recomputed = {"content-length"} | ({"host", "expect"} if request else set())
    # no dropped name ever survives
    for name, _ in kept:
        assert not _must_drop(name, headers, request), name
    # every kept header was in the input, in the input's order (duplicates included)
    assert _is_subsequence(kept, headers)
    # and nothing else was lost
    expected = [
        (n, v)
        for n, v in headers
        if not _must_drop(n, headers, request) and n.lower() not in recomputed
    ]
    assert kept == expected


# --------------------------------------------------------------------------- client address

LOOPBACK: list[IPNetwork] = [ipaddress.ip_network("127.0.0.0/8")]
TRUSTED: list[IPNetwork] = [
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("192.168.1.0/24"),
    ipaddress.ip_network("2001:db8:ffff::/48"),
]


@pytest.mark.parametrize(
    ("peer", "xff", "trusted", "expected"),
    [
        # untrusted peer: any X-Forwarded-For is discarded
        ("203.0.113.9", "198.51.100.1", LOOPBACK, ("203.0.113.9", "203.0.113.9")),
        ("203.0.113.9", "127.0.0.1, 10.0.0.1", LOOPBACK, ("203.0.113.9", "203.0.113.9")),
        ("203.0.113.9", None, LOOPBACK, ("203.0.113.9", "203.0.113.9")),
        ("203.0.113.9", "198.51.100.1", [], ("203.0.113.9", "203.0.113.9")),
        # trusted peer without X-Forwarded-For: the peer is the client
        ("127.0.0.1", None, LOOPBACK, ("127.0.0.1", "127.0.0.1")),
        ("127.0.0.1", "", LOOPBACK, ("127.0.0.1", "127.0.0.1")),
        # trusted peer: right-most entry that is not itself trusted; peer appended
        ("127.0.0.1", "198.51.100.1", LOOPBACK, ("198.51.100.1", "198.51.100.1, 127.0.0.1")),
        (
            "127.0.0.1",
            "6.6.6.6, 198.51.100.1, 127.0.0.5",
            LOOPBACK,
            ("198.51.100.1", "6.6.6.6, 198.51.100.1, 127.0.0.5, 127.0.0.1"),
        ),
        (
            "127.0.0.1",
            " 198.51.100.1 ,127.0.0.2",
            LOOPBACK,
            ("198.51.100.1", " 198.51.100.1 ,127.0.0.2, 127.0.0.1"),
        ),
        # every entry trusted: the left-most is as far as we can see
        (
            "127.0.0.1",
            "127.0.0.3, 127.0.0.2",
            LOOPBACK,
            ("127.0.0.3", "127.0.0.3, 127.0.0.2, 127.0.0.1"),
        ),
        # an unparsable entry stops the walk: nothing left of it is believed
        (
            "127.0.0.1",
            "198.51.100.1, garbage, 127.0.0.2",
            LOOPBACK,
            ("127.0.0.2", "198.51.100.1, garbage, 127.0.0.2, 127.0.0.1"),
        ),
        (
            "127.0.0.1",
            "198.51.100.1, unknown",
            LOOPBACK,
            ("127.0.0.1", "198.51.100.1, unknown, 127.0.0.1"),
        ),
        ("127.0.0.1", "198.51.100.1:4711", LOOPBACK, ("127.0.0.1", "198.51.100.1:4711, 127.0.0.1")),
        ("127.0.0.1", ",", LOOPBACK, ("127.0.0.1", ",, 127.0.0.1")),
        # several trusted networks, mixed families
        (
            "10.1.2.3",
            "198.51.100.1, 2001:db8:ffff::7, 192.168.1.20",
            TRUSTED,
            ("198.51.100.1", "198.51.100.1, 2001:db8:ffff::7, 192.168.1.20, 10.1.2.3"),
        ),
        (
            "2001:db8:ffff::1",
            "2001:db8::42, 10.9.9.9",
            TRUSTED,
            ("2001:db8::42", "2001:db8::42, 10.9.9.9, 2001:db8:ffff::1"),
        ),
        ("192.168.2.1", "198.51.100.1", TRUSTED, ("192.168.2.1", "192.168.2.1")),
        # IPv6 entries, bracketed with a port as some proxies write them, canonicalised
        (
            "127.0.0.1",
            "[2001:DB8::1]:443",
            LOOPBACK,
            ("2001:db8::1", "[2001:DB8::1]:443, 127.0.0.1"),
        ),
        ("127.0.0.1", "2001:0db8:0:0::1", LOOPBACK, ("2001:db8::1", "2001:0db8:0:0::1, 127.0.0.1")),
        # IPv4-mapped IPv6 is the IPv4 address, as peer and as entry
        ("::ffff:127.0.0.1", "198.51.100.1", LOOPBACK, ("198.51.100.1", "198.51.100.1, 127.0.0.1")),
        (
            "127.0.0.1",
            "::ffff:198.51.100.1, ::ffff:127.0.0.9",
            LOOPBACK,
            ("198.51.100.1", "::ffff:198.51.100.1, ::ffff:127.0.0.9, 127.0.0.1"),
        ),
        ("::ffff:203.0.113.9", "198.51.100.1", LOOPBACK, ("203.0.113.9", "203.0.113.9")),
        ("::ffff:203.0.113.9", None, LOOPBACK, ("203.0.113.9", "203.0.113.9")),
        # an IPv6 peer is untrusted by IPv4 networks
        ("::1", "198.51.100.1", LOOPBACK, ("::1", "::1")),
        # a peer that is not an address (a Unix socket) is taken as is, its XFF ignored
        ("", "198.51.100.1", LOOPBACK, ("", "")),
        ("unix", "198.51.100.1", LOOPBACK, ("unix", "unix")),
    ],
)
def test_client_address(
    peer: str,
    xff: str | None,
    trusted: list[IPNetwork],
    expected: tuple[str, str],
) -> None:
    assert client_address(peer, xff, trusted) == expected


@pytest.mark.parametrize(
    ("believed", "proto", "host", "expected"),
    [
        # a trusted front's values are passed on as received, the port kept
        (True, ["https"], ["shop.example:8443"], ("https", "shop.example:8443")),
        (
            True,
            ["https", "http"],
            ["a.example", "b.example"],
            ("https, http", "a.example, b.example"),
        ),
        # what it left out is the proxy's own view
        (True, [], ["shop.example"], ("http", "shop.example")),
        (True, ["https"], [], ("https", "Videos.Acme.Test:8080")),
        (True, [""], [""], ("http", "Videos.Acme.Test:8080")),
        # a value aiohttp would alter on the way out is not passed on
        (True, ["https\udcff"], ["x\udcff"], ("http", "Videos.Acme.Test:8080")),
        # anyone else's are replaced
        (False, ["https"], ["evil.example"], ("http", "Videos.Acme.Test:8080")),
        (False, [], [], ("http", "Videos.Acme.Test:8080")),
    ],
)
def test_forwarded_origin(
    believed: bool, proto: list[str], host: list[str], expected: tuple[str, str]
) -> None:
    assert forwarded_origin(believed, proto, host, "http", "Videos.Acme.Test:8080") == expected


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("127.0.0.1", True),
        ("::ffff:127.0.0.1", True),  # a dual-stack listener's spelling of the same peer
        ("127.0.0.2", True),
        ("10.0.0.1", False),
        ("::1", False),
        ("", False),
        ("unix", False),
    ],
)
def test_trusted_peer(peer: str, expected: bool) -> None:
    assert trusted_peer(peer, LOOPBACK) is expected


_ipv4 = st.ip_addresses(v=4)


@settings(max_examples=200, deadline=None)
@given(_ipv4, st.lists(_ipv4, max_size=6), st.booleans())
def test_client_address_properties(
    peer: ipaddress.IPv4Address, chain: list[ipaddress.IPv4Address], trust_peer: bool
) -> None:
    trusted: list[IPNetwork] = [ipaddress.ip_network("10.0.0.0/8")]
    if trust_peer:
        trusted.append(ipaddress.ip_network(f"{peer}/32"))
    xff = ", ".join(map(str, chain)) or None
    client, forwarded = client_address(str(peer), xff, trusted)
    peer_trusted = any(peer in n for n in trusted)
    if not peer_trusted or xff is None:
        # an untrusted peer can never choose its own address
        assert (client, forwarded) == (str(peer), str(peer))
        return
    # a trusted peer's chain is passed on with the peer appended
    assert forwarded == f"{xff}, {peer}"
    # the client is the right-most untrusted entry, else the left-most entry
    untrusted = [ip for ip in chain if not any(ip in n for n in trusted)]
    assert client == str(untrusted[-1] if untrusted else chain[0])


# --------------------------------------------------------------------------- request id


@pytest.mark.parametrize(
    ("received", "expected"),
    [
        ("9b2f3c4d-1e2f-4a5b-8c7d-0e1f2a3b4c5d", "9b2f3c4d-1e2f-4a5b-8c7d-0e1f2a3b4c5d"),
        ("9B2F3C4D-1E2F-4A5B-8C7D-0E1F2A3B4C5D", "9b2f3c4d-1e2f-4a5b-8c7d-0e1f2a3b4c5d"),
        ("00000000-0000-0000-0000-000000000000", "00000000-0000-0000-0000-000000000000"),
        # any version, not only 4: a UUIDv7 from the caller is kept
        ("018f1f7e-8a51-7d7e-9a44-2b7c0d9c1a01", "018f1f7e-8a51-7d7e-9a44-2b7c0d9c1a01"),
    ],
)
def test_request_id_keeps_a_valid_uuid(received: str, expected: str) -> None:
    assert request_id(received) == expected


@pytest.mark.parametrize(
    "received",
    [
        None,
        "",
        "abc",
        "9b2f3c4d1e2f4a5b8c7d0e1f2a3b4c5d",  # no hyphens
        "{9b2f3c4d-1e2f-4a5b-8c7d-0e1f2a3b4c5d}",
        "urn:uuid:9b2f3c4d-1e2f-4a5b-8c7d-0e1f2a3b4c5d",
        " 9b2f3c4d-1e2f-4a5b-8c7d-0e1f2a3b4c5d",
        "9b2f3c4d-1e2f-4a5b-8c7d-0e1f2a3b4c5d\n",
        "9b2f3c4d-1e2f-4a5b-8c7d-0e1f2a3b4c5g",
        "9b2f3c4d-1e2f-4a5b-8c7d-0e1f2a3b4c5d-extra",
        "x" * 36,
        "<script>alert(1)</script>",
    ],
)
def test_request_id_replaces_anything_else(received: str | None) -> None:
    rid = request_id(received)
    assert rid != received
    parsed = uuid.UUID(rid)
    assert parsed.version == 4
    assert str(parsed) == rid


def test_fresh_request_ids_differ() -> None:
    assert len({request_id(None) for _ in range(50)}) == 50


# A forked child (serve --workers) must not hand out the ids left in the parent's buffer. The
# fork happens in a fresh interpreter, not in the test process (which runs threads).
_FORKED_IDS = """
import os
from proxy.core.forwarding import request_id
request_id(None)  # the buffer is filled, ids remain in it
read, write = os.pipe()
if os.fork() == 0:
    os.write(write, request_id(None).encode())
    os._exit(0)
os.wait()
print(os.read(read, 36).decode(), request_id(None))
"""


def test_a_forked_child_draws_request_ids_of_its_own() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _FORKED_IDS], capture_output=True, text=True, timeout=30, check=True
    )
    child, parent = out.stdout.split()
    assert child != parent


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_request_id_is_always_a_canonical_uuid(received: str) -> None:
    rid = request_id(received)
    assert str(uuid.UUID(rid)) == rid
    if rid == received.lower():
        assert uuid.UUID(received)  # only ever an actual UUID is echoed


@settings(max_examples=100, deadline=None)
@given(st.uuids())
def test_request_id_echoes_any_uuid(value: uuid.UUID) -> None:
    assert request_id(str(value).upper()) == str(value)


def test_fresh_request_ids_are_random_version_4_uuids_across_batches() -> None:
    # More than one batch of the random source (256 ids each): every id a canonical v4 UUID
    # with the RFC 9562 variant, none repeated, every hex digit position varying where random.
    ids = [request_id(None) for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    for rid in ids:
        parsed = uuid.UUID(rid)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, rid)
    assert {rid[19] for rid in ids} == set("89ab")


def test_a_name_listed_in_connection_is_dropped_only_where_it_is_listed() -> None:
    # Decisions per name are remembered; the Connection list of one message is not.
    listed = [("Connection", "X-Trace-Hop"), ("X-Trace-Hop", "1"), ("Accept", "*/*")]
    assert request_headers_to_forward(listed) == [("Accept", "*/*")]
    assert response_headers_to_return(listed) == [("Accept", "*/*")]
    plain = [("X-Trace-Hop", "1"), ("Accept", "*/*")]
    assert request_headers_to_forward(plain) == plain
    assert response_headers_to_return(plain) == plain


def test_many_distinct_names_are_all_decided() -> None:
    # Clients choose header names: past the memo's bound, names are still decided, not cached.
    for i in range(5000):
        headers = [(f"X-Probe-{i}", "1"), (f"X-FlatRender-Probe-{i}", "x"), (f"Proxy-{i}", "x")]
        assert request_headers_to_forward(headers) == [(f"X-Probe-{i}", "1")]


def test_the_peer_is_remembered_but_a_forwarded_chain_still_counts() -> None:
    trusted = [ipaddress.ip_network("10.0.0.0/8")]
    assert client_address("::ffff:10.0.0.5", None, trusted) == ("10.0.0.5", "10.0.0.5")
    assert client_address("::ffff:10.0.0.5", "198.51.100.7", trusted) == (
        "198.51.100.7",
        "198.51.100.7, 10.0.0.5",
    )
    assert client_address("::ffff:10.0.0.5", None, trusted) == ("10.0.0.5", "10.0.0.5")
