"""proxy.core.cors: origin normalisation and matching, preflight and actual headers, Vary
merging and the embed CSP (CONTRACT §4), as tables and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.cors import (
    CorsPolicy,
    actual_headers,
    build_policy,
    frame_ancestors,
    merge_vary,
    normalize_origin,
    preflight_headers,
)
from proxy.core.tenancy import Tenant

# --- normalize_origin ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://www.acme.test", "https://www.acme.test"),
        ("http://localhost:3000", "http://localhost:3000"),
        # scheme and host lower-case
        ("HTTPS://WWW.ACME.TEST", "https://www.acme.test"),
        ("Https://Www.Acme.Test", "https://www.acme.test"),
        # default ports dropped, for the scheme they belong to only
        ("https://www.acme.test:443", "https://www.acme.test"),
        ("http://www.acme.test:80", "http://www.acme.test"),
        ("HTTP://WWW.ACME.TEST:80", "http://www.acme.test"),
        ("https://www.acme.test:80", "https://www.acme.test:80"),
        ("http://www.acme.test:443", "http://www.acme.test:443"),
        # other ports kept
        ("https://www.acme.test:8443", "https://www.acme.test:8443"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        # a bare "/" is tolerated (some clients and config files write it)
        ("https://www.acme.test/", "https://www.acme.test"),
        ("https://www.acme.test:443/", "https://www.acme.test"),
        # IPv6 literals keep their brackets
        ("https://[::1]", "https://[::1]"),
        ("https://[::1]:443", "https://[::1]"),
        ("http://[2001:DB8::1]:8080", "http://[2001:db8::1]:8080"),
        ("http://[2001:db8::1]:80", "http://[2001:db8::1]"),
        # punycode is plain ASCII
        ("https://xn--bcher-kva.example", "https://xn--bcher-kva.example"),
    ],
)
def test_normalize_origin_accepts(raw: str, expected: str) -> None:
    assert normalize_origin(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "null",
        "NULL",
        "Null",
        "*",
        "garbage",
        "www.acme.test",
        "//www.acme.test",
        "https://",
        "https:www.acme.test",
        "https:///www.acme.test",
        # only http(s) origins can call an HTTP API with CORS
        "ftp://www.acme.test",
        "file://",
        "chrome-extension://abcdef",
        "data:text/html,hi",
        # a path other than "/", a query or a fragment (even empty ones)
        "https://www.acme.test/x",
        "https://www.acme.test//",
        "https://www.acme.test/?",
        "https://www.acme.test?",
        "https://www.acme.test#",
        "https://www.acme.test?a=1",
        "https://www.acme.test#frag",
        # userinfo
        "https://user@www.acme.test",
        "https://user:pw@www.acme.test",
        "https://:pw@www.acme.test",
        "https://@www.acme.test",
        # bad ports
        "https://www.acme.test:65536",
        "https://www.acme.test:+1",
        "https://www.acme.test:1_0",
        "https://www.acme.test:443:443",
        "https://www.acme.test:https",
        # bad IPv6
        "https://[::1",
        "https://::1",
        # characters no serialised origin contains; urlsplit would drop the tab and newline
        "https://www.acme\t.test",
        "https://www.acme.test\n",
        "https://www\r.acme.test",
        "https://www acme.test",
        "https://www.acme.test ",
        "https://a,b.acme.test",
        "https://*.acme.test",
        "https://%77ww.acme.test",
        "https://www.acme.test\\x",
        "https://bücher.example",
        "https://www.acme.test\x00",
    ],
)
def test_normalize_origin_refuses(raw: str) -> None:
    assert normalize_origin(raw) is None


# --- CorsPolicy.allows / build_policy ------------------------------------------------------

ACME_ORIGINS = (
    "https://www.acme.test",
    "https://*.acme-studio.test",
    "http://localhost:3000",
    "https://*.ports.test:8443",
)
ACME = build_policy(ACME_ORIGINS, "videos.acme.test")


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        # exact entries, after normalisation
        ("https://www.acme.test", True),
        ("HTTPS://WWW.ACME.TEST", True),
        ("https://www.acme.test:443", True),
        ("https://www.acme.test/", True),
        ("http://www.acme.test", False),  # scheme is part of the origin
        ("https://www.acme.test:8443", False),
        ("https://acme.test", False),
        ("https://www.acme.test.evil.test", False),
        ("https://evilwww.acme.test", False),
        ("http://localhost:3000", True),
        ("http://LOCALHOST:3000", True),
        ("http://localhost", False),
        ("http://localhost:3001", False),
        ("https://localhost:3000", False),
        # wildcard: exactly one label, same scheme, same (default) port
        ("https://a.acme-studio.test", True),
        ("https://A.ACME-STUDIO.TEST", True),
        ("https://a.acme-studio.test:443", True),
        ("https://my-app-1.acme-studio.test", True),
        ("https://acme-studio.test", False),
        ("https://a.b.acme-studio.test", False),
        ("https://aacme-studio.test", False),
        ("https://.acme-studio.test", False),
        ("https://a.acme-studio.test.evil.test", False),
        ("http://a.acme-studio.test", False),
        ("https://a.acme-studio.test:8443", False),
        ("https://*.acme-studio.test", False),  # the entry itself is not an origin
        ("https://a b.acme-studio.test", False),
        ("https://a\t.acme-studio.test", False),
        ("https://a.acme-studio.test/x", False),
        # wildcard with an explicit port: that port only
        ("https://a.ports.test:8443", True),
        ("https://a.ports.test", False),
        ("https://a.ports.test:443", False),
        ("https://a.ports.test:18443", False),
        ("https://a.ports.test:844", False),
        ("https://a.b.ports.test:8443", False),
        ("http://a.ports.test:8443", False),
        # the tenant's custom domain, https only
        ("https://videos.acme.test", True),
        ("https://VIDEOS.acme.test:443", True),
        ("http://videos.acme.test", False),
        ("https://videos.acme.test:8443", False),
        ("https://x.videos.acme.test", False),
        # never
        ("null", False),
        ("", False),
        ("*", False),
    ],
)
def test_allows(origin: str, allowed: bool) -> None:
    assert ACME.allows(origin) is allowed


@pytest.mark.parametrize(
    ("entries", "custom_domain", "exact", "wildcards"),
    [
        ((), None, set(), ()),
        (("HTTPS://WWW.Acme.Test:443/",), None, {"https://www.acme.test"}, ()),
        ((" https://www.acme.test ",), None, {"https://www.acme.test"}, ()),
        (("HTTPS://*.Acme.Test",), None, set(), (("https://", ".acme.test", ""),)),
        (("https://*.acme.test:443",), None, set(), (("https://", ".acme.test", ""),)),
        (("https://*.acme.test:8443",), None, set(), (("https://", ".acme.test", ":8443"),)),
        ((), "Videos.Acme.Test", {"https://videos.acme.test"}, ()),
        # unusable entries are ignored, not fatal
        (("null", "*", "*.acme.test", "https://*.acme.test/x", "ftp://a.test"), None, set(), ()),
    ],
)
def test_build_policy(
    entries: tuple[str, ...],
    custom_domain: str | None,
    exact: set[str],
    wildcards: tuple[tuple[str, str, str], ...],
) -> None:
    policy = build_policy(entries, custom_domain)
    assert policy.exact == exact
    assert policy.wildcards == wildcards


def test_empty_policy_allows_nothing() -> None:
    assert not CorsPolicy().allows("https://www.acme.test")
    assert not build_policy((), None).allows("https://www.acme.test")


def test_tenant_compiles_its_policy() -> None:
    tenant = Tenant(
        id="t",
        slug="acme",
        status="Active",
        custom_domain="videos.acme.test",
        allowed_origins=("https://www.acme.test",),
    )
    assert tenant.cors.allows("https://www.acme.test")
    assert tenant.cors.allows("https://videos.acme.test")
    assert not tenant.cors.allows("http://videos.acme.test")


# --- preflight_headers / actual_headers ----------------------------------------------------

ORIGIN = "https://www.acme.test"


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (None, ["Authorization"]),
        ("", ["Authorization"]),
        ("Content-Type", ["Content-Type", "Authorization"]),
        ("content-type, x-request-id", ["content-type", "x-request-id", "Authorization"]),
        ("Content-Type,X-Api-Key", ["Content-Type", "X-Api-Key", "Authorization"]),
        # already requested: named once, as the client wrote it
        ("authorization", ["authorization"]),
        ("Authorization, Content-Type", ["Authorization", "Content-Type"]),
        (" Content-Type , ,Authorization ", ["Content-Type", "Authorization"]),
    ],
)
def test_preflight_headers(requested: str | None, expected: list[str]) -> None:
    headers = preflight_headers(ORIGIN, "POST", requested)
    assert headers is not None
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    assert headers["Access-Control-Allow-Methods"] == "POST"
    assert _names(headers["Access-Control-Allow-Headers"]) == expected
    assert headers["Access-Control-Allow-Credentials"] == "true"
    assert headers["Access-Control-Max-Age"] == "600"
    assert "*" not in headers.values()
    assert "origin" in {v.lower() for v in _names(headers["Vary"])}
    assert {k for k in headers if k.lower().startswith("access-control-")} == {
        "Access-Control-Allow-Origin",
        "Access-Control-Allow-Methods",
        "Access-Control-Allow-Headers",
        "Access-Control-Allow-Credentials",
        "Access-Control-Max-Age",
    }


@pytest.mark.parametrize("method", ["GET", "DELETE", "PATCH", "PROPFIND"])
def test_preflight_echoes_the_requested_method(method: str) -> None:
    headers = preflight_headers(ORIGIN, method, None)
    assert headers is not None and headers["Access-Control-Allow-Methods"] == method


@pytest.mark.parametrize(
    ("method", "requested"),
    [
        ("", None),
        ("GE T", None),
        ("GET,POST", None),
        ("GET\r\nX: y", None),
        ("(GET)", None),
        ("GET", "Content Type"),
        ("GET", "X-A, X:B"),
        ("GET", "X-A;x=1"),
        ("GET", 'X-"A"'),
        ("GET", "X-A\r\nSet-Cookie: a=b"),
        ("GET", "ümlaut"),
    ],
)
def test_preflight_refuses_malformed_tokens(method: str, requested: str | None) -> None:
    assert preflight_headers(ORIGIN, method, requested) is None


def test_actual_headers() -> None:
    headers = actual_headers(ORIGIN)
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    assert headers["Access-Control-Allow-Credentials"] == "true"
    exposed = {n.lower() for n in _names(headers["Access-Control-Expose-Headers"])}
    assert exposed >= {
        "x-request-id",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "ratelimit",
        "ratelimit-policy",
    }
    assert "*" not in headers.values()


# --- merge_vary -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("existing", "add", "expected"),
    [
        (None, "Origin", ["Origin"]),
        ("", "Origin", ["Origin"]),
        ("Accept-Encoding", "Origin", ["Accept-Encoding", "Origin"]),
        (
            "Accept-Encoding, Accept-Language",
            "Origin",
            ["Accept-Encoding", "Accept-Language", "Origin"],
        ),
        ("Origin", "Origin", ["Origin"]),
        ("origin", "Origin", ["origin"]),
        ("Accept-Encoding,ORIGIN", "Origin", ["Accept-Encoding", "ORIGIN"]),
        (
            "Origin",
            "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            ["Origin", "Access-Control-Request-Method", "Access-Control-Request-Headers"],
        ),
        (
            "Accept-Encoding, access-control-request-method",
            "Origin, Access-Control-Request-Method",
            ["Accept-Encoding", "access-control-request-method", "Origin"],
        ),
        # "*" already varies on everything
        ("*", "Origin", ["*"]),
        ("Accept-Encoding, *", "Origin", ["Accept-Encoding", "*"]),
    ],
)
def test_merge_vary(existing: str | None, add: str, expected: list[str]) -> None:
    assert _names(merge_vary(existing, add)) == expected


# --- frame_ancestors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("enabled", "hosts", "expected"),
    [
        (True, ["https://www.acme.test"], "frame-ancestors https://www.acme.test"),
        (
            True,
            ["https://www.acme.test", "https://*.acme-studio.test"],
            "frame-ancestors https://www.acme.test https://*.acme-studio.test",
        ),
        (True, [], "frame-ancestors 'self'"),
        (True, [""], "frame-ancestors 'self'"),
        (False, ["https://www.acme.test"], "frame-ancestors 'self'"),
        (False, [], "frame-ancestors 'self'"),
        # hostile values (a space or tab adds sources, ";" adds directives) are dropped
        (True, ["https://a.test; script-src *"], "frame-ancestors 'self'"),
        (True, ["https://a.test *"], "frame-ancestors 'self'"),
        (True, ["https://a.test\t*"], "frame-ancestors 'self'"),
        (True, ["https://a.test\n*"], "frame-ancestors 'self'"),
        (True, ["https://a.test\r\nSet-Cookie: x=y"], "frame-ancestors 'self'"),
        (True, ["https://a.test,https://b.test"], "frame-ancestors 'self'"),
        (True, ["'unsafe-inline'"], "frame-ancestors 'self'"),
        (True, ['"https://a.test"'], "frame-ancestors 'self'"),
        (True, ["https://ok.test", "https://bad.test; x"], "frame-ancestors https://ok.test"),
        (True, ["https://ok.test", "https://bad.test\t*"], "frame-ancestors https://ok.test"),
    ],
)
def test_frame_ancestors(enabled: bool, hosts: list[str], expected: str) -> None:
    assert frame_ancestors(enabled, hosts) == expected


# --- properties -------------------------------------------------------------------------------

LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
DOMAIN = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
SCHEME = st.sampled_from(["http", "https"])
PORT = st.none() | st.integers(min_value=1, max_value=65535)
DEFAULT_PORT = {"http": 80, "https": 443}


def _origin(scheme: str, host: str, port: int | None) -> str:
    return f"{scheme}://{host}" + ("" if port is None else f":{port}")


def _recase(data: st.DataObject, text: str) -> str:
    flips = data.draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if f else c for c, f in zip(text, flips, strict=True))


@given(
    data=st.data(),
    scheme=SCHEME,
    host=DOMAIN,
    port=PORT,
    entries=st.lists(st.tuples(SCHEME, DOMAIN, PORT), max_size=4),
    listed=st.booleans(),
    wildcard=st.booleans(),
)
def test_allows_ignores_case_and_default_port(
    data: st.DataObject,
    scheme: str,
    host: str,
    port: int | None,
    entries: list[tuple[str, str, int | None]],
    listed: bool,
    wildcard: bool,
) -> None:
    origins = [_origin(*e) for e in entries]
    if listed:
        origins.append(_origin(scheme, host, port))
    if wildcard and "." in host:
        origins.append(_origin(scheme, "*." + host.partition(".")[2], port))
    policy = build_policy(origins, None)
    canonical = _origin(scheme, host, None if port == DEFAULT_PORT[scheme] else port)
    variant = _recase(data, scheme) + "://" + _recase(data, host)
    if port is not None:
        variant += f":{port}"
    elif data.draw(st.booleans()):
        variant += f":{DEFAULT_PORT[scheme]}"
    assert policy.allows(variant) == policy.allows(canonical)
    if listed:
        assert policy.allows(variant)


@given(
    entries=st.lists(st.text() | st.sampled_from(["null", "*", "https://*.null", "null:80"])),
    custom_domain=st.none() | st.text() | st.just("null"),
)
def test_null_is_never_allowed(entries: list[str], custom_domain: str | None) -> None:
    policy = build_policy(entries, custom_domain)
    assert not policy.allows("null")


@given(label=LABEL, extra=LABEL, suffix=DOMAIN, port=st.none() | st.just(8443), data=st.data())
def test_wildcard_matches_one_label_only(
    label: str, extra: str, suffix: str, port: int | None, data: st.DataObject
) -> None:
    policy = build_policy([_origin("https", "*." + suffix, port)], None)
    assert policy.allows(_origin("https", _recase(data, f"{label}.{suffix}"), port))
    assert not policy.allows(_origin("https", f"{extra}.{label}.{suffix}", port))
    assert not policy.allows(_origin("https", suffix, port))
    assert not policy.allows(_origin("http", f"{label}.{suffix}", port))


@given(st.text())
def test_normalize_origin_is_idempotent(raw: str) -> None:
    canon = normalize_origin(raw)
    if canon is not None:
        assert normalize_origin(canon) == canon
        assert canon == canon.lower()
