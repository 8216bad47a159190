"""proxy.core.apikeys: key format, lookup, scopes and authorisation (CONTRACT §5)."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.apikeys import (
    ApiKey,
    IPNetwork,
    ParsedKey,
    authorize,
    bearer_key,
    find_match,
    hash_key,
    ip_allowed,
    parse_key,
    presented_key,
    required_scope,
    scope_covers,
)
from proxy.errors import (
    ApiKeyExpired,
    ApiKeyRevoked,
    InsufficientScope,
    IpNotAllowed,
    ProxyError,
    TenantMismatch,
)

LIVE = "fr_live_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8S9t"
TEST = "fr_test_" + "z" * 32
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TENANT = "6f1c1f9e-8a51-4d7e-9a44-2b7c0d9c1a01"
OTHER_TENANT = "00000000-0000-0000-0000-000000000001"


def _key(raw: str = LIVE, **changes: object) -> ApiKey:
    key = ApiKey(
        id="key-1",
        tenant_id=TENANT,
        environment="live",
        key_prefix=raw[:12],
        key_hash=hashlib.sha256(raw.encode()).hexdigest(),
        scopes=("renders:read",),
    )
    return replace(key, **changes)  # type: ignore[arg-type]


def _nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# --------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    ("key", "environment"),
    [
        (LIVE, "live"),
        (TEST, "test"),
        ("fr_live_" + "0" * 32, "live"),  # the shortest
        ("fr_live_" + "a" * 120, "live"),  # the longest accepted
        ("fr_test_" + BASE62, "test"),
    ],
)
def test_parse_key_accepts(key: str, environment: str) -> None:
    assert parse_key(key) == ParsedKey(
        prefix=key[:12],
        hash=hashlib.sha256(key.encode("ascii")).hexdigest(),
        environment=environment,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    "key",
    [
        "",
        "fr_live_",
        "fr_live_" + "a" * 31,  # one short
        "fr_live_" + "a" * 121,  # over the bound that keeps hostile 8 KiB "keys" cheap
        "fr_prod_" + "a" * 40,
        "FR_LIVE_" + "a" * 40,
        "fr_Live_" + "a" * 40,
        "fr_live" + "a" * 40,
        "fr-live-" + "a" * 40,
        "sk_live_" + "a" * 40,
        "fr_live_" + "a" * 39 + "-",
        "fr_live_" + "a" * 39 + "_",
        "fr_live_" + "a" * 39 + "=",
        "fr_live_" + "a" * 39 + " ",
        " fr_live_" + "a" * 40,
        "fr_live_" + "a" * 40 + "\n",
        "fr_live_" + "ä" * 40,  # non-ASCII letters are not base62
        "fr_live_" + "\uff41" * 40,  # fullwidth "a"
        "fr_live_" + "\u0661" * 40,  # Arabic-Indic digit one
        "Bearer fr_live_" + "a" * 40,
    ],
)
def test_parse_key_rejects(key: str) -> None:
    assert parse_key(key) is None


def test_prefix_hash_and_last4_as_stored() -> None:
    parsed = parse_key(LIVE)
    assert parsed is not None
    assert parsed.prefix == "fr_live_A1b2"
    assert len(parsed.prefix) == 12
    assert parsed.hash == hash_key(LIVE) == hashlib.sha256(LIVE.encode()).hexdigest()
    assert parsed.hash == parsed.hash.lower() and len(parsed.hash) == 64


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["live", "test"]),
    st.text(alphabet=BASE62, min_size=32, max_size=120),
)
def test_every_well_formed_key_parses(environment: str, body: str) -> None:
    key = f"fr_{environment}_{body}"
    parsed = parse_key(key)
    assert parsed is not None
    assert parsed.environment == environment
    assert key.startswith(parsed.prefix) and len(parsed.prefix) == 12
    assert parsed.hash == hashlib.sha256(key.encode()).hexdigest()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=140))
def test_parse_key_never_raises_and_accepts_only_the_format(text: str) -> None:
    parsed = parse_key(text)
    if parsed is not None:
        assert text[:8] in ("fr_live_", "fr_test_")
        assert 32 <= len(text) - 8 <= 120
        assert all(c in BASE62 for c in text[8:])


# --------------------------------------------------------------------------- find_match


def test_find_match_over_candidates_sharing_a_prefix() -> None:
    same_prefix = [LIVE[:12] + tail for tail in ("x" * 30, "y" * 31, LIVE[12:], "z" * 40)]
    keys = [_key(raw, id=f"key-{i}") for i, raw in enumerate(same_prefix)]
    assert {k.key_prefix for k in keys} == {LIVE[:12]}
    assert find_match(hash_key(LIVE), keys) == keys[2]
    assert find_match(hash_key(LIVE), list(reversed(keys))) == keys[2]


def test_find_match_no_candidate_or_wrong_key() -> None:
    assert find_match(hash_key(LIVE), []) is None
    wrong = LIVE[:-1] + ("u" if LIVE[-1] != "u" else "v")
    assert find_match(hash_key(wrong), [_key(LIVE)]) is None


def test_find_match_accepts_upper_case_stored_hash() -> None:
    stored = _key(LIVE, key_hash=hash_key(LIVE).upper())
    assert find_match(hash_key(LIVE), [stored]) == stored


# --------------------------------------------------------------------------- scopes


@pytest.mark.parametrize(
    ("granted", "required", "covers"),
    [
        ("renders:read", "renders:read", True),
        ("renders:read", "renders:create", False),
        ("renders:create", "renders:read", False),
        ("renders:*", "renders:read", True),
        ("renders:*", "renders:delete", True),
        ("renders:*", "renders:admin:purge", True),
        ("renders:*", "renders:*", True),
        ("*", "renders:read", True),
        ("*", "projects:write", True),
        # a wildcard covers its own namespace only, on the ":" boundary
        ("renders:*", "rendersx:read", False),
        ("renders:*", "render:read", False),
        ("renders:*", "projects:read", False),
        ("renders:*", "renders", False),
        ("render*", "renders:read", False),  # only "*" and "<ns>:*" are wildcards
        ("renders:read", "renders:*", False),
        ("renders:r*", "renders:read", False),
        # case-sensitive, like the database's TEXT[]
        ("Renders:read", "renders:read", False),
        ("RENDERS:*", "renders:read", False),
        # the impossible scope "" of a method a route does not list: nothing covers it
        ("*", "", False),
        ("renders:*", "", False),
        ("", "", False),
        ("", "renders:read", False),
    ],
)
def test_scope_covers(granted: str, required: str, covers: bool) -> None:
    assert scope_covers(granted, required) is covers


SCOPES = {"GET": "renders:read", "POST": "renders:create", "DELETE": "renders:delete"}


@pytest.mark.parametrize(
    ("scopes", "method", "expected"),
    [
        (SCOPES, "GET", "renders:read"),
        (SCOPES, "POST", "renders:create"),
        (SCOPES, "DELETE", "renders:delete"),
        # HEAD needs what GET needs (RFC 9110 §9.3.2) unless listed itself
        (SCOPES, "HEAD", "renders:read"),
        ({**SCOPES, "HEAD": "renders:head"}, "HEAD", "renders:head"),
        ({"POST": "renders:create"}, "HEAD", ""),
        # an unlisted method demands the impossible scope
        (SCOPES, "PUT", ""),
        (SCOPES, "PATCH", ""),
        (SCOPES, "OPTIONS", ""),
        (SCOPES, "get", ""),  # methods are case-sensitive (RFC 9110 §9.1)
        # a route without scopes demands none
        ({}, "GET", None),
        ({}, "PATCH", None),
    ],
)
def test_required_scope(scopes: dict[str, str], method: str, expected: str | None) -> None:
    assert required_scope(scopes, method) == expected


@pytest.mark.parametrize(
    "scopes", [("*",), ("renders:*",), ("renders:read", "renders:create", "renders:delete"), ("",)]
)
def test_unlisted_method_is_denied_to_every_key(scopes: tuple[str, ...]) -> None:
    key = _key(scopes=scopes)
    scope = required_scope(SCOPES, "PATCH")
    with pytest.raises(InsufficientScope):
        authorize(key, now=NOW, client_ip="192.0.2.1", request_tenant_id=None, scope=scope)


# --------------------------------------------------------------------------- authorize


def _authorize(
    key: ApiKey,
    *,
    now: datetime = NOW,
    client_ip: str = "192.0.2.1",
    tenant: str | None = TENANT,
    scope: str | None = "renders:read",
) -> None:
    authorize(key, now=now, client_ip=client_ip, request_tenant_id=tenant, scope=scope)


@pytest.mark.parametrize(
    "key",
    [
        _key(),
        _key(expires_at=NOW + timedelta(seconds=1)),
        _key(scopes=("renders:*",)),
        _key(scopes=("projects:read", "*")),
        _key(allowed_ips=_nets("192.0.2.0/24")),
        _key(allowed_ips=_nets("2001:db8::/32", "192.0.2.1/32")),
    ],
)
def test_authorize_passes(key: ApiKey) -> None:
    _authorize(key)  # raises on refusal


def test_authorize_on_platform_domain_ignores_tenant() -> None:
    _authorize(_key(tenant_id=OTHER_TENANT), tenant=None)


def test_authorize_without_route_scopes_needs_no_scope() -> None:
    _authorize(_key(scopes=()), scope=None)


@pytest.mark.parametrize(
    ("key", "kwargs", "error"),
    [
        (_key(revoked_at=NOW - timedelta(days=1)), {}, ApiKeyRevoked),
        (_key(revoked_at=NOW + timedelta(days=1)), {}, ApiKeyRevoked),  # set means revoked
        (_key(is_active=False), {}, ApiKeyRevoked),
        (_key(expires_at=NOW), {}, ApiKeyExpired),  # expired at the instant itself
        (_key(expires_at=NOW - timedelta(seconds=1)), {}, ApiKeyExpired),
        (_key(), {"tenant": OTHER_TENANT}, TenantMismatch),
        (_key(allowed_ips=()), {}, IpNotAllowed),  # empty list: nobody
        (_key(allowed_ips=_nets("198.51.100.0/24")), {}, IpNotAllowed),
        (_key(allowed_ips=_nets("198.51.100.0/24")), {"client_ip": "not-an-ip"}, IpNotAllowed),
        (_key(allowed_ips=_nets("192.0.2.0/24")), {"client_ip": ""}, IpNotAllowed),
        (_key(scopes=()), {}, InsufficientScope),
        (_key(scopes=("renders:create",)), {}, InsufficientScope),
        (_key(scopes=("rendersx:*",)), {}, InsufficientScope),
        # the first failing check decides, in the contract's order of statuses
        (_key(revoked_at=NOW, expires_at=NOW - timedelta(days=1)), {}, ApiKeyRevoked),
        (_key(expires_at=NOW, scopes=()), {"tenant": OTHER_TENANT}, ApiKeyExpired),
        (_key(allowed_ips=()), {"tenant": OTHER_TENANT}, TenantMismatch),
        (_key(allowed_ips=(), scopes=()), {}, IpNotAllowed),
    ],
)
def test_authorize_refuses(key: ApiKey, kwargs: dict[str, str], error: type[ProxyError]) -> None:
    with pytest.raises(error):
        _authorize(key, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (ApiKeyRevoked, 401, "api_key_revoked"),
        (ApiKeyExpired, 401, "api_key_expired"),
        (TenantMismatch, 403, "tenant_mismatch"),
        (IpNotAllowed, 403, "ip_not_allowed"),
        (InsufficientScope, 403, "insufficient_scope"),
    ],
)
def test_refusals_carry_the_contract_status_and_code(
    error: type[ProxyError], status: int, code: str
) -> None:
    assert (error.status, error.code) == (status, code)


@pytest.mark.parametrize(
    ("client_ip", "cidrs", "allowed"),
    [
        ("192.0.2.7", ("192.0.2.0/24",), True),
        ("192.0.2.7", ("192.0.2.7/32",), True),
        ("192.0.2.8", ("192.0.2.7/32",), False),
        ("198.51.100.1", ("192.0.2.0/24", "198.51.100.0/30"), True),
        ("2001:db8::1", ("2001:db8::/32",), True),
        ("2001:DB8:0::1", ("2001:db8::/32",), True),
        ("2001:db9::1", ("2001:db8::/32",), False),
        ("2001:db8::1", ("192.0.2.0/24",), False),
        ("192.0.2.7", ("2001:db8::/32",), False),
        # an IPv4-mapped client is the IPv4 client
        ("::ffff:192.0.2.7", ("192.0.2.0/24",), True),
        ("::ffff:198.51.100.7", ("192.0.2.0/24",), False),
        ("192.0.2.7", ("0.0.0.0/0",), True),
        ("2001:db8::1", ("::/0",), True),
        ("192.0.2.7", (), False),
        ("", ("0.0.0.0/0",), False),
        ("garbage", ("0.0.0.0/0",), False),
        ("192.0.2.7/32", ("0.0.0.0/0",), False),
    ],
)
def test_ip_allowed(client_ip: str, cidrs: tuple[str, ...], allowed: bool) -> None:
    assert ip_allowed(client_ip, _nets(*cidrs)) is allowed


def test_allowed_ips_none_means_any_address() -> None:
    for ip in ("192.0.2.1", "2001:db8::1", "::ffff:10.0.0.1", "not-even-an-ip"):
        _authorize(_key(allowed_ips=None), client_ip=ip)


# --------------------------------------------------------------------------- presented key


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        (None, None),
        ("", None),
        (f"Bearer {LIVE}", LIVE),
        (f"bearer {LIVE}", LIVE),
        (f"BEARER {LIVE}", LIVE),
        (f"BeArEr {LIVE}", LIVE),
        (f"  Bearer   {LIVE}  ", LIVE),
        (f"Bearer {TEST}", TEST),
        # anything that starts like a key is this proxy's to judge (and refuse when malformed)
        ("Bearer fr_garbage", "fr_garbage"),
        # other bearer tokens (an OAuth JWT for the upstream) are not API keys
        ("Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", None),
        ("Bearer", None),
        ("Bearer ", None),
        (f"Basic {LIVE}", None),
        (f"Token {LIVE}", None),
        (LIVE, None),
        (f"Bearer{LIVE}", None),
    ],
)
def test_bearer_key(authorization: str | None, expected: str | None) -> None:
    assert bearer_key(authorization) == expected


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "expected"),
    [
        (None, None, None),
        (f"Bearer {LIVE}", None, LIVE),
        (None, LIVE, LIVE),
        (None, f"  {LIVE} ", LIVE),
        (f"Bearer {LIVE}", LIVE, LIVE),  # the same key twice is fine
        # two different keys: ambiguous, refused as invalid ("" matches no key)
        (f"Bearer {LIVE}", TEST, ""),
        (f"Bearer {TEST}", LIVE, ""),
        # a non-key bearer token next to X-API-Key is for the upstream; X-API-Key is the key
        ("Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", LIVE, LIVE),
        # alone, a bearer token is a key attempt: malformed, so invalid (not missing)
        ("Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", None, "eyJhbGciOiJIUzI1NiJ9.e30.sig"),
        ("Bearer not-a-key", None, "not-a-key"),
        ("Bearer", None, ""),
        ("Bearer   ", None, ""),
        # another scheme presents no API key
        ("Basic dXNlcjpwYXNz", None, None),
        # X-API-Key is always a key attempt, well-formed or not
        (None, "not-a-key", "not-a-key"),
    ],
)
def test_presented_key(
    authorization: str | None, x_api_key: str | None, expected: str | None
) -> None:
    assert presented_key(authorization, x_api_key) == expected
