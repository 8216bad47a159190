"""The PROXY protocol header, versions 1 and 2 (haproxy's doc/proxy-protocol.txt).

A front that relays TCP connections (haproxy ``send-proxy``/``send-proxy-v2``, cloud network
load balancers) writes one header before the client's bytes, saying where the connection came
from. These functions only read it; whether it is believed (the peer is a trusted proxy) is the
connection's decision.

Hand-written rather than taken from the one PyPI library (``proxy-protocol``): that one is marked
alpha, has not had a release since 2024, and is lenient where a parser facing a network must not
be (it reads ports with ``int()``, so ``8_0`` and ``+80`` are port 80; bounding a v1 line to 107
bytes is left to the caller). What is needed here is small: the address of the source, whether
the client's own connection was TLS, and how many bytes the header took.

Strict, as the specification asks: a v1 line is at most 107 bytes and ends in CRLF, with
addresses in their canonical text form and ports of 1-5 digits without leading zeros; a v2
header has version 2, a known command, and lengths that add up. A v2 ``LOCAL`` header (the
front's own health check), ``UNKNOWN``/``AF_UNSPEC`` and ``AF_UNIX`` sources keep the
connection's own address. The v2 CRC32C TLV is not verified: the header comes from a trusted
front over TCP, which already checksums it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_BYTES = 107  # §2.1: the longest possible line, CRLF included

_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V2_HEAD = 16
_V2_COMMANDS = (0x0, 0x1)  # LOCAL, PROXY
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM = 0x1
_ADDRESS_BYTES = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
_PP2_TYPE_SSL, _PP2_CLIENT_SSL = 0x20, 0x01


class BadProxyHeader(ValueError):
    """Bytes that begin like a PROXY header but are not a valid one."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    length: int  # bytes the header took; what follows is the client's own
    source: tuple[str, int] | None  # (address, port); None: keep the connection's own
    tls: bool = False  # v2 PP2_TYPE_SSL with PP2_CLIENT_SSL: the client connected over TLS


def starts_with_proxy_header(data: bytes | bytearray) -> bool | None:
    """Whether ``data`` begins with a v1 or v2 signature; None while too short to tell."""
    undecided = False
    for signature in (V1_PREFIX, V2_SIGNATURE):
        n = min(len(data), len(signature))
        if data[:n] == signature[:n]:
            if n == len(signature):
                return True
            undecided = True
    return None if undecided else False


def parse_proxy_header(data: bytes | bytearray) -> ProxyHeader | None:
    """The header at the start of ``data``; None while it is incomplete. Raises
    ``BadProxyHeader`` when it is malformed or ``data`` does not begin with one."""
    data = bytes(data[: V1_MAX_BYTES if data.startswith(V1_PREFIX) else _V2_HEAD + 0xFFFF])
    if data.startswith(V2_SIGNATURE):
        return _v2(data)
    if data.startswith(V1_PREFIX):
        return _v1(data)
    if starts_with_proxy_header(data) is None:
        return None
    raise BadProxyHeader("not a PROXY protocol header")


def _v1(data: bytes) -> ProxyHeader | None:
    newline = data.find(b"\n", 0, V1_MAX_BYTES)
    if newline < 0:
        if len(data) >= V1_MAX_BYTES:
            raise BadProxyHeader("v1 line longer than 107 bytes")
        return None
    if data[newline - 1] != ord("\r"):
        raise BadProxyHeader("v1 line not ended by CRLF")
    parts = data[len(V1_PREFIX) : newline - 1].split(b" ")
    length = newline + 1
    if parts[0] == b"UNKNOWN":  # §2.1: the rest of the line is ignored
        return ProxyHeader(length, None)
    if len(parts) != 5:
        raise BadProxyHeader("v1 line needs protocol, two addresses and two ports")
    family, source, destination, source_port, destination_port = parts
    version = {b"TCP4": 4, b"TCP6": 6}.get(family)
    if version is None:
        raise BadProxyHeader("v1 protocol is not TCP4, TCP6 or UNKNOWN")
    address = _address(source, version)
    _address(destination, version)
    port = _port(source_port)
    _port(destination_port)
    return ProxyHeader(length, (address, port))


def _address(text: bytes, version: int) -> str:
    try:
        if b"%" in text:  # Python takes a scope id ("fe80::1%eth0"); the protocol has none
            raise ValueError(text)
        decoded = text.decode("ascii")
        ip = ipaddress.IPv4Address(decoded) if version == 4 else ipaddress.IPv6Address(decoded)
    except (UnicodeDecodeError, ValueError):
        raise BadProxyHeader(f"v1 address is not an IPv{version} address") from None
    return str(ip)


def _port(text: bytes) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise BadProxyHeader("v1 port is not a number from 0 to 65535")
    return int(text)


def _v2(data: bytes) -> ProxyHeader | None:
    if len(data) < _V2_HEAD:
        return None
    version_command, family_transport = data[12], data[13]
    length = _V2_HEAD + int.from_bytes(data[14:16], "big")
    if version_command >> 4 != 2:
        raise BadProxyHeader("v2 header of another version")
    command = version_command & 0xF
    if command not in _V2_COMMANDS:
        raise BadProxyHeader("v2 command is neither LOCAL nor PROXY")
    family, transport = family_transport >> 4, family_transport & 0xF
    if family not in _ADDRESS_BYTES or transport > 0x2:
        raise BadProxyHeader("v2 address family or transport unknown")
    if len(data) < length:
        return None
    body = data[_V2_HEAD:length]
    if command == 0x0:  # LOCAL: the front speaking for itself (health checks)
        return ProxyHeader(length, None)
    size = _ADDRESS_BYTES[family]
    if len(body) < size:
        raise BadProxyHeader("v2 length shorter than its addresses")
    tls = _client_tls(body[size:])
    if family in (_AF_UNSPEC, _AF_UNIX):
        return ProxyHeader(length, None, tls)
    if transport != _STREAM:
        raise BadProxyHeader("v2 transport of an HTTP connection must be STREAM")
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    if family == _AF_INET:
        ip, port = ipaddress.IPv4Address(body[0:4]), int.from_bytes(body[8:10], "big")
    else:
        ip, port = ipaddress.IPv6Address(body[0:16]), int.from_bytes(body[32:34], "big")
    return ProxyHeader(length, (str(ip), port), tls)


def _client_tls(tlvs: bytes) -> bool:
    """Whether the TLVs (§2.2.1: type, 2-byte length, value) hold PP2_TYPE_SSL saying the
    client's connection was TLS. TLVs of other types are skipped; one that overruns is not."""
    tls, at = False, 0
    while at < len(tlvs):
        if at + 3 > len(tlvs):
            raise BadProxyHeader("v2 TLV cut short")
        kind, size = tlvs[at], int.from_bytes(tlvs[at + 1 : at + 3], "big")
        value = tlvs[at + 3 : at + 3 + size]
        if len(value) != size:
            raise BadProxyHeader("v2 TLV longer than the header")
        if kind == _PP2_TYPE_SSL and value and value[0] & _PP2_CLIENT_SSL:
            tls = True
        at += 3 + size
    return tls
