"""Per-tenant CORS decisions (CONTRACT §4), pure.

Hand-written rather than aiohttp-cors: that library configures origins per route at start-up,
cannot follow per-tenant ``allowed_origins`` that change at run time, and does not emit
``Vary: Origin``. The rules follow the Fetch standard (§3.2 "CORS protocol"):

- Origins compare after normalisation: scheme and host lower-case, default port dropped
  (RFC 6454 §4 serialises an origin this way). ``null`` (sandboxed frames, file: pages,
  redirects) is never allowed: anyone can produce it.
- ``https://*.example.com`` matches exactly one label (``a.example.com``, not ``example.com``
  nor ``a.b.example.com``), with the same scheme and port.
- With credentials allowed, ``Access-Control-Allow-Origin`` must be the origin itself, never
  ``*``, and ``Access-Control-Allow-Headers: *`` would not cover ``Authorization`` (Fetch
  §3.2.3), so the requested headers are echoed with ``Authorization`` named explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from proxy.core.forwarding import TOKEN

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Every character a serialised http(s) origin can hold (RFC 6454 §6.2: ASCII, punycode host,
# IPv6 in brackets). Checked before urlsplit, which silently deletes tabs and newlines
# ("https://www.acme\t.test" would pass for www.acme.test) and accepts an empty "?" or "#",
# spaces, "*" or "%" in a host (so "https://*.example.com" would match its own wildcard).
_ORIGIN_CHARS = re.compile(r"[A-Za-z0-9.:/\[\]_-]+")
MAX_AGE = "600"
EXPOSE = (
    "X-Request-Id, X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, "
    "RateLimit, RateLimit-Policy, Retry-After"
)


def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in canonical form, or None when it is not a usable origin."""
    if not origin or origin == "null" or not _ORIGIN_CHARS.fullmatch(origin):
        return None
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if (
        scheme not in _DEFAULT_PORTS
        or not parts.hostname
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    exact: frozenset[str] = frozenset()
    # (scheme + "://", ".suffix", ":port" or "") for each "scheme://*.suffix[:port]" entry
    wildcards: tuple[tuple[str, str, str], ...] = ()

    def allows(self, origin: str) -> bool:
        canon = normalize_origin(origin)
        if canon is None:
            return False
        if canon in self.exact:
            return True
        for scheme, suffix, port in self.wildcards:
            if not canon.startswith(scheme):
                continue
            hostport = canon[len(scheme) :]
            host = hostport[: len(hostport) - len(port)] if port else hostport
            if port and not hostport.endswith(port):
                continue
            if ":" in host and not host.startswith("["):
                continue  # has a port the entry does not name
            label = host[: -len(suffix)] if host.endswith(suffix) else ""
            if label and "." not in label:
                return True
        return False


def build_policy(allowed_origins: Iterable[str], custom_domain: str | None) -> CorsPolicy:
    """Compile a tenant's entries once, when the tenant is loaded; bad entries are ignored."""
    exact: set[str] = set()
    wildcards: list[tuple[str, str, str]] = []
    for entry in allowed_origins:
        entry = entry.strip()
        scheme, sep, rest = entry.partition("://*.")
        if sep:
            canon = normalize_origin(f"{scheme}://x.{rest}")
            if canon is None:
                continue
            scheme_part, _, hostport = canon.partition("://")
            host, _, port = hostport[2:].partition(":")
            wildcards.append((scheme_part + "://", "." + host, f":{port}" if port else ""))
        elif (canon := normalize_origin(entry)) is not None:
            exact.add(canon)
    if custom_domain:
        exact.add(f"https://{custom_domain.lower()}")
    return CorsPolicy(frozenset(exact), tuple(wildcards))


def preflight_headers(
    origin: str, request_method: str, request_headers: str | None
) -> dict[str, str] | None:
    """Headers of a 204 preflight answer, or None if the request is malformed."""
    if not TOKEN.fullmatch(request_method):
        return None
    names = [h.strip() for h in (request_headers or "").split(",") if h.strip()]
    if not all(TOKEN.fullmatch(n) for n in names):
        return None
    if not any(n.lower() == "authorization" for n in names):
        names.append("Authorization")
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": request_method,
        "Access-Control-Allow-Headers": ", ".join(names),
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Max-Age": MAX_AGE,
        "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    }


def actual_headers(origin: str) -> dict[str, str]:
    """Headers for a non-preflight answer to an allowed origin, whatever its status."""
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Expose-Headers": EXPOSE,
    }


def frame_ancestors(embed_enabled: bool, allowed_hosts: Iterable[str]) -> str:
    """CSP for studio embeds (CSP Level 3 §6.4.2 frame-ancestors)."""
    # A source is one token of visible ASCII: whitespace of any kind (a tab as much as a space)
    # separates sources and ";" ends the directive, so such a value could add "*" or another
    # directive; a control character would make the header invalid.
    hosts = [h for h in allowed_hosts if h and all("!" <= c <= "~" and c not in ";,'\"" for c in h)]
    if embed_enabled and hosts:
        return "frame-ancestors " + " ".join(hosts)
    return "frame-ancestors 'self'"


def merge_vary(existing: str | None, add: str) -> str:
    """RFC 9110 §12.5.5: Vary is a list; add field names not already named (or covered by *)."""
    if not existing:
        return add
    present = {v.strip().lower() for v in existing.split(",")}
    if "*" in present:
        return existing
    extra = [v.strip() for v in add.split(",") if v.strip().lower() not in present]
    return ", ".join([existing, *extra]) if extra else existing
