"""Host header normalisation and classification (CONTRACT §3).

Normalised form: port stripped, lower-case, one trailing dot removed (an FQDN's root label,
RFC 1034 §3.1), internationalised names in their IDNA ASCII form (RFC 5891) so that a Unicode
Host and its ``xn--`` spelling find the same tenant. IPv6 literals keep their brackets
(RFC 3986 §3.2.2). Anything else that is not a valid DNS name is rejected: a Host is used as a
cache key and database lookup, so garbage must stop here.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


class BadHost(ValueError):
    """The Host header is missing or not a valid host[:port]."""


def _is_port(text: str) -> bool:
    """RFC 3986 §3.2.3 ``port = *DIGIT``: ASCII digits only (``str.isdigit`` takes "٨٠", "²")."""
    return text.isascii() and (text == "" or text.isdigit())


@functools.lru_cache(maxsize=4096)
def normalize_host(raw: str) -> str:
    """Memoised: a server sees the same few Host values over and over. Refusals raise, so they
    are never cached; the bound keeps a flood of made-up names from growing it."""
    raw = raw.strip()
    if not raw:
        raise BadHost("empty Host")
    if raw.startswith("["):
        end = raw.find("]")
        rest = raw[end + 1 :] if end > 0 else "?"
        if rest and not (rest[0] == ":" and _is_port(rest[1:])):
            raise BadHost("malformed IPv6 literal")
        if "%" in raw[1:end]:
            # RFC 3986's IPv6address has no zone (Python's ipaddress accepts "fe80::1%eth0");
            # a zone names an interface of the sender and means nothing to this server.
            raise BadHost("malformed IPv6 literal")
        try:
            ip = ipaddress.IPv6Address(raw[1:end])
        except ValueError:
            raise BadHost("malformed IPv6 literal") from None
        return f"[{ip.compressed}]"
    host, sep, port = raw.rpartition(":")
    if not sep:
        host = raw
    elif not _is_port(port):
        raise BadHost("malformed port")
    host = host.lower()
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise BadHost("invalid internationalised name") from None
    # After IDNA, which maps the other dots of RFC 3490 §3.1 (U+3002, U+FF0E, U+FF61) to ".".
    if host.endswith("."):
        host = host[:-1]
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise BadHost("invalid host name")
    return host


@dataclass(frozen=True, slots=True)
class HostMatch:
    """Where a normalised host may point (CONTRACT §3): a tenant slug, the platform apex, some
    other reserved name under a platform domain (which points nowhere), or a custom domain."""

    kind: Literal["slug", "platform", "reserved", "other"]
    slug: str = ""


def platform_domain_of(host: str, platform_domains: tuple[str, ...]) -> str | None:
    """The longest platform domain that ``host`` equals or ends in (as whole labels), or None.

    Longest, not first: with ``flatrender.test`` and ``eu.flatrender.test`` both listed,
    ``eu.flatrender.test`` is an apex, not the slug ``eu``, whatever the order of the list."""
    best: str | None = None
    for domain in platform_domains:
        if (host == domain or host.endswith("." + domain)) and (
            best is None or len(domain) > len(best)
        ):
            best = domain
    return best


def is_platform_name(host: str, platform_domains: tuple[str, ...]) -> bool:
    """A platform domain or any name under it: reserved for slugs and the apex (CONTRACT §3),
    so never a tenant's custom domain, never a challenge, never allowed by ``/tls/allowed``.

    ``host`` must be normalised (``normalize_host``) first."""
    return platform_domain_of(host, platform_domains) is not None


@functools.lru_cache(maxsize=4096)
def classify_host(host: str, platform_domains: tuple[str, ...]) -> HostMatch:
    """``<slug>.<platform domain>`` (one label), a platform domain itself, another name under
    a platform domain (reserved: it resolves to nothing), or anything else (a custom domain)."""
    domain = platform_domain_of(host, platform_domains)
    if domain is None:
        return HostMatch("other")
    if host == domain:
        return HostMatch("platform")
    slug = host[: -len(domain) - 1]
    return HostMatch("reserved") if "." in slug else HostMatch("slug", slug)
