"""proxy.core.proxy_header: PROXY protocol v1 and v2 (haproxy's doc/proxy-protocol.txt), by table
and fuzzed with hypothesis: any bytes give a header, "incomplete" or BadProxyHeader, never
another exception; every header built by the specification's rules reads back as built, and no
prefix of it is taken for a whole one."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.core.proxy_header import (
    V1_MAX_BYTES,
    V2_SIGNATURE,
    BadProxyHeader,
    ProxyHeader,
    parse_proxy_header,
    starts_with_proxy_header,
)

GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def v2(
    command: int = 0x1,
    family: int = 0x1,
    transport: int = 0x1,
    addresses: bytes = b"",
    tlvs: bytes = b"",
    version: int = 2,
    length: int | None = None,
) -> bytes:
    body = addresses + tlvs
    size = len(body) if length is None else length
    return (
        V2_SIGNATURE
        + bytes([version << 4 | command, family << 4 | transport])
        + struct.pack("!H", size)
        + body
    )


def inet(source: str, source_port: int, destination: str = "192.0.2.1", port: int = 443) -> bytes:
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    return src.packed + dst.packed + struct.pack("!HH", source_port, port)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


SSL_CLIENT = tlv(0x20, b"\x01" + b"\x00\x00\x00\x00")  # PP2_CLIENT_SSL, verify ok


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n" + GET, ("203.0.113.7", 56324, False)),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 0\r\n", ("2001:db8::7", 65535, False)),
        (b"PROXY TCP6 ::ffff:203.0.113.7 ::1 1 2\r\n", ("::ffff:cb00:7107", 1, False)),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),  # the rest of an UNKNOWN line is ignored
        (v2(addresses=inet("203.0.113.7", 56324)) + GET, ("203.0.113.7", 56324, False)),
        (
            v2(family=0x2, addresses=inet("2001:db8::7", 8080, "2001:db8::1")),
            ("2001:db8::7", 8080, False),
        ),
        (v2(addresses=inet("203.0.113.7", 1), tlvs=SSL_CLIENT), ("203.0.113.7", 1, True)),
        # unknown TLVs are skipped; an SSL TLV without the client bit is not TLS
        (
            v2(addresses=inet("203.0.113.7", 1), tlvs=tlv(0xE0, b"x" * 300) + tlv(0x20, b"\0" * 5)),
            ("203.0.113.7", 1, False),
        ),
        (v2(command=0x0, family=0x0, transport=0x0), None),  # LOCAL: the front's health check
        (v2(command=0x0, addresses=inet("203.0.113.7", 1)), None),  # LOCAL ignores addresses
        (v2(family=0x0, transport=0x0), None),  # AF_UNSPEC: keep the connection's address
        (v2(family=0x3, addresses=b"/run/a".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0")), None),
    ],
)
def test_valid_headers(data: bytes, expected: tuple[str, int, bool] | None) -> None:
    header = parse_proxy_header(data)
    assert header is not None
    assert data[header.length :] in (GET, b"")
    if expected is None:
        assert header.source is None
    else:
        assert (*(header.source or ()), header.tls) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\n",  # LF alone
        b"PROXY TCP4 203.0.113.7 192.0.2.1 56324\r\n",  # a field missing
        b"PROXY TCP4 203.0.113.7  192.0.2.1 56324 443\r\n",  # two spaces
        b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443 \r\n",  # trailing space
        b"PROXY TCP5 203.0.113.7 192.0.2.1 56324 443\r\n",
        b"PROXY tcp4 203.0.113.7 192.0.2.1 56324 443\r\n",
        b"PROXY TCP4 2001:db8::7 192.0.2.1 56324 443\r\n",  # family and address disagree
        b"PROXY TCP6 203.0.113.7 2001:db8::1 56324 443\r\n",
        b"PROXY TCP4 203.0.113.07 192.0.2.1 56324 443\r\n",  # leading zero: not canonical
        b"PROXY TCP4 203.0.113.256 192.0.2.1 56324 443\r\n",
        b"PROXY TCP6 fe80::1%eth0 2001:db8::1 1 2\r\n",  # scope ids are not addresses here
        b"PROXY TCP4 203.0.113.7 192.0.2.1 65536 443\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 056324 443\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 8_0 443\r\n",  # int() would take these
        b"PROXY TCP4 203.0.113.7 192.0.2.1 +80 443\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 -1 443\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 \xd9\xa1 443\r\n",  # a non-ASCII digit
        b"PROXY TCP4 \xcb\x00q\x07 192.0.2.1 1 2\r\n",
        b"PROXY " + b"A" * V1_MAX_BYTES,  # no line end within 107 bytes
        v2(version=1, addresses=inet("203.0.113.7", 1)),
        v2(command=0x2, addresses=inet("203.0.113.7", 1)),
        v2(family=0x4, addresses=inet("203.0.113.7", 1)),
        v2(transport=0x3, addresses=inet("203.0.113.7", 1)),
        v2(transport=0x2, addresses=inet("203.0.113.7", 1)),  # DGRAM: not this connection
        v2(addresses=b"\0" * 11),  # shorter than its addresses
        v2(family=0x2, addresses=inet("203.0.113.7", 1)),  # IPv4-sized for AF_INET6
        v2(addresses=inet("203.0.113.7", 1), tlvs=b"\x20\x00"),  # a TLV cut short
        v2(addresses=inet("203.0.113.7", 1), tlvs=tlv(0x20, b"\x01")[:-1] + b""),
        GET,  # not a PROXY header at all
    ],
)
def test_malformed_headers_are_refused(data: bytes) -> None:
    with pytest.raises(BadProxyHeader):
        parse_proxy_header(data)


def test_overrunning_tlv_is_refused() -> None:
    header = v2(addresses=inet("203.0.113.7", 1), tlvs=b"\x20\x00\x09\x01")
    with pytest.raises(BadProxyHeader):
        parse_proxy_header(header)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", None),
        (b"P", None),
        (b"PROXY", None),
        (b"PROXY ", True),
        (b"PROXZ", False),
        (b"\r\n\r\n\x00\r\nQUI", None),
        (V2_SIGNATURE, True),
        (b"\r\n\r\n\x00\r\nQUIT!", False),
        (b"\r\nGET", False),
        (GET, False),
    ],
)
def test_starts_with_proxy_header(data: bytes, expected: bool | None) -> None:
    assert starts_with_proxy_header(data) is expected


# --------------------------------------------------------------------------- properties

_ports = st.integers(0, 65535)
_tlv = st.builds(tlv, st.integers(0, 255), st.binary(max_size=40))


@st.composite
def _headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A header built by the specification's rules, and what it says."""
    v6 = draw(st.booleans())
    source = draw(st.ip_addresses(v=6 if v6 else 4))
    destination = draw(st.ip_addresses(v=6 if v6 else 4))
    port = draw(_ports)
    if draw(st.booleans()):
        line = f"PROXY TCP{6 if v6 else 4} {source} {destination} {port} {draw(_ports)}\r\n"
        data = line.encode()
        return data, ProxyHeader(len(data), (str(source), port))
    tls = draw(st.booleans())
    tlvs = b"".join(draw(st.lists(_tlv, max_size=4))) + (SSL_CLIENT if tls else b"")
    addresses = source.packed + destination.packed + struct.pack("!HH", port, draw(_ports))
    data = v2(family=0x2 if v6 else 0x1, addresses=addresses, tlvs=tlvs)
    claims_tls = tls or any(
        kind == 0x20 and value and value[0] & 1 for kind, value in _read_tlvs(tlvs)
    )
    return data, ProxyHeader(len(data), (str(source), port), claims_tls)


def _read_tlvs(tlvs: bytes) -> list[tuple[int, bytes]]:
    out, at = [], 0
    while at < len(tlvs):
        size = int.from_bytes(tlvs[at + 1 : at + 3], "big")
        out.append((tlvs[at], tlvs[at + 3 : at + 3 + size]))
        at += 3 + size
    return out


@settings(max_examples=300, deadline=None)
@given(_headers(), st.binary(max_size=64))
def test_a_built_header_reads_back_and_no_prefix_passes_for_it(
    built: tuple[bytes, ProxyHeader], rest: bytes
) -> None:
    data, expected = built
    assert parse_proxy_header(data + rest) == expected
    assert parse_proxy_header(bytearray(data + rest)) == expected  # the connection's buffer
    assert starts_with_proxy_header(data) is True
    for cut in range(len(data)):
        assert parse_proxy_header(data[:cut]) is None, cut


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=120).map(lambda b: b"PROXY " + b),
        st.binary(max_size=120).map(lambda b: V2_SIGNATURE + b),
        st.lists(
            st.sampled_from(
                [
                    b"PROXY",
                    b" ",
                    b"TCP4",
                    b"TCP6",
                    b"UNKNOWN",
                    b"1.2.3.4",
                    b"::1",
                    b"80",
                    b"\r\n",
                    b"\n",
                    b"0",
                ]
            ),
            max_size=12,
        ).map(b"".join),
    )
)
@example(V2_SIGNATURE + b"\x21\x11\xff\xff")
def test_any_bytes_give_a_header_incomplete_or_bad_proxy_header(data: bytes) -> None:
    try:
        header = parse_proxy_header(data)
    except BadProxyHeader:
        with pytest.raises(BadProxyHeader):
            parse_proxy_header(bytearray(data))
        return
    assert parse_proxy_header(bytearray(data)) == header
    if header is not None:
        assert 0 < header.length <= len(data)
        assert starts_with_proxy_header(data) is True
        if header.source is not None:
            ipaddress.ip_address(header.source[0])
            assert 0 <= header.source[1] <= 65535
