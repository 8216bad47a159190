"""API keys: format, hashing, constant-time verification and authorisation (CONTRACT §5).

A key is ``fr_live_`` or ``fr_test_`` followed by 32 or more base62 characters; only its
12-character prefix, SHA-256 hex and last four characters are ever stored. The format is checked
before any lookup so garbage never reaches a store, and candidates sharing a prefix are all
compared with ``hmac.compare_digest`` (no early exit), so timing reveals nothing about which
hash bytes matched.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from proxy.core.forwarding import IPNetwork
from proxy.errors import (
    ApiKeyExpired,
    ApiKeyRevoked,
    InsufficientScope,
    IpNotAllowed,
    TenantMismatch,
)

Environment = Literal["live", "test"]

PREFIX_LEN = 12
# Upper bound keeps a hostile 8 KiB "key" from costing a hash; minted keys are 8 + 43 chars.
_KEY = re.compile(r"fr_(live|test)_[0-9A-Za-z]{32,120}")


@dataclass(frozen=True, slots=True)
class ParsedKey:
    prefix: str
    hash: str
    environment: Environment


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    tenant_id: str
    environment: Environment
    key_prefix: str
    key_hash: str
    scopes: tuple[str, ...] = ()
    allowed_ips: tuple[IPNetwork, ...] | None = None  # None: any address
    rate_limit_rpm: int = 600
    is_active: bool = True
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


def looks_like_key(token: str) -> bool:
    return token.startswith("fr_")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def parse_key(key: str) -> ParsedKey | None:
    m = _KEY.fullmatch(key)
    if m is None:
        return None
    env: Environment = "live" if m.group(1) == "live" else "test"
    return ParsedKey(prefix=key[:PREFIX_LEN], hash=hash_key(key), environment=env)


def find_match(key_hash: str, candidates: Iterable[ApiKey]) -> ApiKey | None:
    """Compare against every candidate in constant time per comparison; no early exit."""
    found: ApiKey | None = None
    expected = key_hash.encode("ascii")
    for candidate in candidates:
        if hmac.compare_digest(expected, candidate.key_hash.lower().encode("ascii")):
            found = candidate
    return found


def scope_covers(granted: str, required: str) -> bool:
    """``*`` covers everything; ``renders:*`` covers every ``renders:`` scope.

    Nothing covers ``""``, the impossible scope ``required_scope`` demands for a method the
    route does not list: not ``*``, and not an empty scope string that slipped into a key row.
    """
    if not required:
        return False
    if granted == required or granted == "*":
        return True
    return granted.endswith(":*") and required.startswith(granted[:-1])


def required_scope(scopes: Mapping[str, str], method: str) -> str | None:
    """The scope a route demands for ``method``; HEAD needs what GET needs (RFC 9110 §9.3.2).

    A route that names scopes but not this method demands the impossible scope ``""``:
    deny by default rather than let an unlisted method through.
    """
    if not scopes:
        return None
    if method == "HEAD" and "HEAD" not in scopes:
        method = "GET"
    return scopes.get(method, "")


def authorize(
    key: ApiKey,
    *,
    now: datetime,
    client_ip: str,
    request_tenant_id: str | None,
    scope: str | None,
) -> None:
    """Raise the contract error for a matched key that may not make this request."""
    if key.revoked_at is not None or not key.is_active:
        raise ApiKeyRevoked()
    if key.expires_at is not None and now >= key.expires_at:
        raise ApiKeyExpired()
    if request_tenant_id is not None and key.tenant_id != request_tenant_id:
        raise TenantMismatch()
    if key.allowed_ips is not None and not ip_allowed(client_ip, key.allowed_ips):
        raise IpNotAllowed()
    if scope is not None and not any(scope_covers(g, scope) for g in key.scopes):
        raise InsufficientScope()


def ip_allowed(client_ip: str, allowed: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in allowed)


def bearer_token(authorization: str | None) -> str | None:
    """The credentials of ``Authorization: Bearer <token>`` (``""`` when there are none);
    ``None`` for another scheme or no header."""
    if authorization is None:
        return None
    # Any whitespace after the scheme, not only SP (RFC 9110 §11.4): "Bearer<TAB>fr_live_…" is
    # a key too, and must be judged (and kept from the upstream) like one.
    parts = authorization.split(None, 1)
    if not parts or parts[0].lower() != "bearer":
        return None
    return parts[1].strip() if len(parts) == 2 else ""


def bearer_key(authorization: str | None) -> str | None:
    """The API key in ``Authorization: Bearer fr_...``; other bearer tokens are not keys."""
    token = bearer_token(authorization)
    return token if token is not None and looks_like_key(token) else None


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a request presents, well-formed or not (CONTRACT §5: ``Bearer not-a-key`` is an
    invalid key, not a missing one); two different keys count as invalid.

    With ``X-API-Key`` present, a bearer token that is not a key is the upstream's (an OAuth
    token next to the key) and is left alone. ``None``: no key presented at all.
    """
    from_header = x_api_key.strip() if x_api_key is not None else None
    if from_header is None:
        return bearer_token(authorization)
    from_bearer = bearer_key(authorization)
    if from_bearer is not None and from_bearer != from_header:
        return ""  # ambiguous: matches no key, so it is refused as invalid
    return from_header


_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SECRET_LEN = 43  # 43 base62 characters carry 256 bits (the issue asks for at least 192)
_SCOPE = re.compile(r"\*|[a-z][a-z0-9_-]*:(\*|[a-z][a-z0-9_.-]*)")


def mint_key(environment: Environment) -> str:
    """A new key from the OS's CSPRNG (``secrets``); shown once, never stored."""
    import secrets

    return f"fr_{environment}_" + "".join(secrets.choice(_BASE62) for _ in range(SECRET_LEN))


def valid_scope(scope: str) -> bool:
    """``resource:action``, ``resource:*`` or ``*``."""
    return _SCOPE.fullmatch(scope) is not None
