"""Where a webhook may send (CONTRACT §11): a server-side request forgery policy.

A reseller writes its webhook's URL, so the URL is hostile input: it may name the metadata
service (169.254.169.254), Postgres on loopback, or a host whose DNS answers a private address
(or answers a public one first and a private one on the next lookup: DNS rebinding). So:

- the scheme must be https (http only with ``webhooks.allow_http``);
- every address the host resolves to must be public unicast, unless it lies in
  ``webhooks.allow_networks``; one refused address refuses the destination;
- the connection goes to the address that was checked: ``GuardedResolver`` is the aiohttp
  connector's resolver, so the check and the connect use the same answer, with no second
  lookup in between. An IP literal in the URL never reaches a resolver (aiohttp connects to it
  directly), so ``check_url`` checks it up front, as aiohttp will see it: the host of the
  ``yarl.URL`` aiohttp builds, after IDNA/UTS 46 mapping (fullwidth digits become ASCII:
  U+FF11 U+FF12 U+FF17 ".0.0.1" is 127.0.0.1), and by aiohttp's own test for "an IP literal".
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.helpers import is_ip_address
from yarl import URL

from proxy.core.forwarding import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DestinationNotAllowed(OSError):
    """Raised by the resolver (aiohttp wraps it) and by ``check_url``; nothing was sent."""


def public_unicast(ip: IPAddress) -> bool:
    """Not loopback, private (RFC 1918, fc00::/7), shared (100.64.0.0/10), link-local
    (169.254.0.0/16, fe80::/10), multicast, reserved or unspecified. ``is_global`` alone
    would let multicast and the deprecated site-local fec0::/10 through. An IPv6 address that
    carries an IPv4 one (IPv4-mapped, 6to4 2002::/16) is judged by that IPv4 address too: a
    6to4 relay would deliver 2002:a00:1:: to 10.0.0.1."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return public_unicast(ip.ipv4_mapped)
        if ip.sixtofour is not None and not public_unicast(ip.sixtofour):
            return False
        if ip.is_site_local:
            return False
    return ip.is_global and not (
        ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_private
    )


class Policy:
    def __init__(self, *, allow_http: bool, allow_networks: Sequence[IPNetwork]) -> None:
        self.allow_http = allow_http
        self.allow_networks = tuple(allow_networks)

    def address_allowed(self, ip: IPAddress) -> bool:
        if any(ip.version == n.version and ip in n for n in self.allow_networks):
            return True
        return public_unicast(ip)

    def check_url(self, url: str) -> None:
        """Scheme, and the host itself when aiohttp will take it as an IP literal; names are
        checked when the connector resolves them (``GuardedResolver``)."""
        try:
            parts = URL(url)
            host = parts.raw_host  # what aiohttp's connector connects to or resolves
            parts.port  # noqa: B018 - raises for a port that is not a number
        except (ValueError, TypeError, UnicodeError):
            raise DestinationNotAllowed("malformed URL") from None
        schemes = ("https", "http") if self.allow_http else ("https",)
        if parts.scheme not in schemes or not host:
            raise DestinationNotAllowed(f"scheme {parts.scheme!r} not allowed")
        bare = host.rstrip(".")
        try:
            literal = ipaddress.ip_address(bare)
        except ValueError:
            if is_ip_address(host):
                # aiohttp would hand it to the socket as an address (0177.0.0.1, a zone
                # index): a form that is not a plain literal is refused, not guessed at.
                raise DestinationNotAllowed(f"address {host!r} not a plain IP literal") from None
            return
        if not self.address_allowed(literal):
            raise DestinationNotAllowed(f"address {literal} not allowed")


class GuardedResolver(AbstractResolver):
    """Resolves through ``inner`` and hands the connector only answers whose every address
    the policy allows."""

    def __init__(self, inner: AbstractResolver, policy: Policy) -> None:
        self._inner = inner
        self._policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        if not answers:
            raise OSError(f"{host}: no address")
        for answer in answers:
            ip = ipaddress.ip_address(answer["host"].split("%", 1)[0])
            if not self._policy.address_allowed(ip):
                raise DestinationNotAllowed(f"{host}: address {ip} not allowed")
        return answers

    async def close(self) -> None:
        await self._inner.close()
