"""Header hygiene for forwarding: pure functions over (name, value) pairs.

- Hop-by-hop headers are removed both ways (RFC 9110 §7.6.1): ``Connection``, every header it
  names, and the fixed set below; ``Proxy-*`` headers are included (RFC 9110 §11.7 and the
  de-facto ``Proxy-Connection``).
- Headers the proxy sets itself are dropped from the inbound side first, so a client can never
  spoof them: ``X-FlatRender-*`` (CONTRACT §7), the ``X-Forwarded-*`` trio (rebuilt from what
  the proxy knows, or believed from a trusted front: ``forwarded_origin``), RFC 7239
  ``Forwarded`` (never sent: the upstream gets the ``X-Forwarded-*`` trio), ``X-Request-Id``.
- A field whose value is not valid UTF-8 is dropped: aiohttp cannot send it unaltered.
- The client address follows the "right-most untrusted" rule used by nginx's realip module and
  Envoy's ``xff_num_trusted_hops``: only a trusted peer's ``X-Forwarded-For`` is believed.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

# Trusted proxies, a key's allowed_ips, webhooks.allow_networks: the one alias.
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Header = tuple[str, str]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Inbound headers replaced by the proxy's own values, or framing it recomputes. ``Host`` is the
# upstream's (the client's host travels as X-Forwarded-Host); ``Content-Length`` is re-sent from
# the parsed request; ``Expect`` is answered by the proxy itself (pipeline.entry.send_continue).
_REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "content-length",
    "expect",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "x-api-key",  # only ever carries a raw API key, which never goes upstream (CONTRACT §5)
}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}

SPOOF_PREFIX = "x-flatrender-"
# RFC 9110 §5.6.2 token: a field name, a method, a list element of Access-Control-Request-Headers.
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def connection_named(headers: Iterable[Header]) -> frozenset[str]:
    """The header names listed in every ``Connection`` header, lower-cased."""
    named: frozenset[str] = frozenset()
    for name, value in headers:
        if name.lower() == "connection":
            named = named | _connection_tokens(value)
    return named


# A decision per header name: (its lower-case form, dropped whatever the request). Names recur
# from request to request, so each is decided once; bounded, since clients choose the names.
Decision = tuple[str, bool]
_MEMO_MAX = 4096


def _decided(name: str, memo: dict[str, Decision], always: Callable[[str], bool]) -> Decision:
    low = name.lower()
    known = (low, always(low))
    if len(memo) < _MEMO_MAX:
        memo[name] = known
    return known


def _forwardable(value: str) -> bool:
    """Whether aiohttp's writer sends ``value`` as it was received.

    aiohttp decodes field bytes that are not UTF-8 (RFC 9110's obs-text) to lone surrogates and
    its writer silently deletes those when it serialises a head, so the next hop would get a
    different value: ``Bearer\\xff fr_live_…``, judged not to be a key here, would arrive as a
    well-formed ``Bearer fr_live_…``. Such a field is dropped rather than altered."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _filter(
    headers: Sequence[Header], memo: dict[str, Decision], always: Callable[[str], bool]
) -> list[Header]:
    kept: list[Header] = []
    named: frozenset[str] = frozenset()  # what Connection headers list goes too
    for header in headers:
        name = header[0]
        low, dropped = memo.get(name) or _decided(name, memo, always)
        if dropped:
            if low == "connection":
                named = named | _connection_tokens(header[1])
        elif _forwardable(header[1]):
            kept.append(header)
    if named - HOP_BY_HOP:  # "keep-alive" or "close" alone name nothing that was kept
        kept = [h for h in kept if h[0].lower() not in named]
    return kept


@functools.lru_cache(maxsize=256)
def _connection_tokens(value: str) -> frozenset[str]:
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


def _request_drops(low: str) -> bool:
    return low in _REQUEST_DROP or low.startswith("proxy-") or low.startswith(SPOOF_PREFIX)


def _response_drops(low: str) -> bool:
    return (
        low in _RESPONSE_DROP
        or low.startswith("proxy-")
        or low.startswith(SPOOF_PREFIX)
        or low.startswith("access-control-")
        or not TOKEN.fullmatch(low)
    )


_REQUEST_MEMO: dict[str, Decision] = {}
_RESPONSE_MEMO: dict[str, Decision] = {}


def request_headers_to_forward(headers: Sequence[Header]) -> list[Header]:
    """Inbound headers minus hop-by-hop, spoofable and proxy-owned ones."""
    return _filter(headers, _REQUEST_MEMO, _request_drops)


def response_headers_to_return(headers: Sequence[Header]) -> list[Header]:
    """Upstream response headers minus hop-by-hop ones and framing the proxy recomputes.

    ``X-FlatRender-*`` from upstream is dropped too: it is an internal namespace. So is every
    ``Access-Control-*``: CORS is the proxy's decision per tenant (CONTRACT §4), and an upstream
    answering ``*`` must not widen it. So is a field whose name is not a token (RFC 9110
    §5.6.2): aiohttp's client parses responses leniently and hands over ``Content-Length ``
    (a space before the colon) as a name of its own, which none of the rules above recognise;
    re-sent beside the proxy's own framing, a lenient next hop would read two.
    """
    return _filter(headers, _RESPONSE_MEMO, _response_drops)


def is_trusted(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, trusted: Sequence[IPNetwork]
) -> bool:
    return any(ip in net for net in trusted)


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443" as some proxies write it
        text = text[1 : text.index("]")]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=4096)
def _peer(peer: str) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    """The peer's address in one spelling, parsed once per peer: a client's connections and
    requests repeat it, and ``ipaddress`` is slow."""
    ip = _parse_ip(peer)
    # One spelling per client whichever branch decides: a dual-stack listener reports
    # "::ffff:192.0.2.7", which audit rows, per-IP limits and allowed_ips see as 192.0.2.7.
    return (peer if ip is None else str(ip)), ip


def trusted_peer(peer: str, trusted: Sequence[IPNetwork]) -> bool:
    """Whether the connection's peer is one of ``trusted_proxies`` (its headers are believed)."""
    ip = _peer(peer)[1]
    return ip is not None and is_trusted(ip, trusted)


def forwarded_origin(
    believed: bool,
    received_proto: Sequence[str],
    received_host: Sequence[str],
    scheme: str,
    host: str,
) -> tuple[str, str]:
    """``X-Forwarded-Proto`` and ``X-Forwarded-Host`` for the upstream (CONTRACT §7), from the
    lines of each that arrived.

    A trusted front (``believed``) terminated the client's connection, so its values describe
    it: they are passed on as received (several lines as one list, RFC 9110 §5.3), the port in
    the host included. Anyone else's would let a client choose the scheme and host the upstream
    builds absolute URLs and cookies for, so they are replaced by the proxy's own view: the
    scheme of the connection it received and the ``Host`` header as sent. A value a trusted
    front left out, or sent in bytes aiohttp cannot pass on unaltered, is the proxy's own view.
    """
    if not believed:
        return scheme, host
    proto, fhost = ", ".join(received_proto), ", ".join(received_host)
    return (
        proto if proto and _forwardable(proto) else scheme,
        fhost if fhost and _forwardable(fhost) else host,
    )


def client_address(
    peer: str, forwarded_for: str | None, trusted: Sequence[IPNetwork]
) -> tuple[str, str]:
    """Decide the client address and the ``X-Forwarded-For`` to send upstream (CONTRACT §7).

    From a trusted peer: walk ``X-Forwarded-For`` right to left, skipping trusted proxies; the
    first untrusted entry is the client. An unparsable entry stops the walk (nothing left of it
    can be believed) and the last believed hop is the client. The upstream gets the received
    list with the peer appended. From any other peer the received list is discarded.
    """
    peer, peer_ip = _peer(peer)
    if peer_ip is None or not forwarded_for or not is_trusted(peer_ip, trusted):
        return peer, peer
    client = peer
    for entry in reversed(forwarded_for.split(",")):
        ip = _parse_ip(entry)
        if ip is None:
            break
        client = str(ip)
        if not is_trusted(ip, trusted):
            break
    return client, f"{forwarded_for}, {peer}"


def _fresh_ids() -> Iterator[str]:
    """Version-4 UUIDs (RFC 9562 §5.4) from ``os.urandom`` read 256 at a time: a quarter of
    ``str(uuid.uuid4())``'s cost, which reads the random source once per id."""
    while True:
        raw = os.urandom(16 * 256).hex()
        for i in range(0, len(raw), 32):
            h = raw[i : i + 32]
            # version nibble 4; variant bits 10 (the nibble one of 8, 9, a, b)
            yield f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


_VARIANT = "89ab"
new_request_id = _fresh_ids().__next__


def _reset_request_ids() -> None:
    """A forked child (``serve --workers``) inherits the parent's buffer of ids not yet
    used: without a fresh one, every worker would hand out the same ids (RFC 9562 §6.9)."""
    global new_request_id
    new_request_id = _fresh_ids().__next__


os.register_at_fork(after_in_child=_reset_request_ids)


def request_id(received: str | None) -> str:
    """The client's ``X-Request-Id`` if it is a UUID (canonical lower-case), else a new one."""
    if received is not None and len(received) == 36 and _UUID.fullmatch(received):
        return received.lower()
    return new_request_id()
