"""CORS and embeds through a real proxy process in embedded mode (CONTRACT §4), one test per row
of the contract: preflights answered by the proxy before authentication and without any
upstream, actual requests decorated on every status, upstream Access-Control-* replaced, Vary
merged, and the frame-ancestors policy of embed routes."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.test_embedded import _key_row, mint
from tests.procs import (
    Echo,
    Proxy,
    RawResponse,
    free_port,
    raw_request,
    start_proxy,
    stop,
    wait_port,
    write_config,
)

ACME = "bbbbbbbb-0000-0000-0000-000000000001"
DEFAULT = "00000000-0000-0000-0000-000000000001"
ACME_HOST = "videos.acme.test"
ORIGINS = ["https://www.acme.test", "https://*.acme-studio.test", "http://localhost:3000"]
ALLOWED = "https://www.acme.test"
EXPOSED = {
    "x-request-id",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit",
    "ratelimit-policy",
}
PREFLIGHT_HEADERS = {
    "access-control-allow-origin",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-allow-credentials",
    "access-control-max-age",
}

# An upstream that sends two Vary lines, lower-case and mixed-case Access-Control-* headers
# and a Vary: * answer; loadtests/echo_upstream.py sends a single Vary.
VARY_UPSTREAM = """
import sys
from aiohttp import web

async def handle(request):
    response = web.Response(text="ok")
    if request.path.endswith("/star"):
        response.headers.add("Vary", "*")
    else:
        response.headers.add("Vary", "Accept-Encoding")
        response.headers.add("Vary", "Accept-Language")
    response.headers.add("access-control-allow-origin", "*")
    response.headers.add("Access-Control-Allow-Credentials", "false")
    response.headers.add("Access-Control-Expose-Headers", "X-Internal-Secret")
    return response

app = web.Application()
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


@dataclass
class World:
    proxy: Proxy
    echo: Echo
    keys: dict[str, str]


@pytest.fixture(scope="module")
def vary_upstream() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", VARY_UPSTREAM, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_port(port, proc)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def world(
    echo: Echo, vary_upstream: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    d = tmp_path_factory.mktemp("cors")
    keys = {"good": mint(), "limited": mint()}
    rows = [
        _key_row("cors-good", keys["good"], "acme", scopes=["renders:*"]),
        _key_row("cors-limited", keys["limited"], "acme", scopes=["*"], rate_limit_rpm=1),
    ]
    origins = json.dumps(ORIGINS)
    tenants = d / "tenants.toml"
    tenants.write_text(
        f"""
[[tenants]]
id = "{DEFAULT}"
slug = "flatrender"
status = "Active"

[[tenants]]
id = "{ACME}"
slug = "acme"
status = "Active"
custom_domain = "{ACME_HOST}"
domain_verified = true
allowed_origins = {origins}
branding = {{ embed_enabled = true, embed_allowed_hosts = ["https://www.acme.test"] }}

[[tenants]]
id = "bbbbbbbb-0000-0000-0000-000000000002"
slug = "noembed"
status = "Active"
allowed_origins = {origins}
branding = {{ embed_enabled = false, embed_allowed_hosts = ["https://www.acme.test"] }}

[[tenants]]
id = "bbbbbbbb-0000-0000-0000-000000000003"
slug = "bare"
status = "Active"

[[tenants]]
id = "bbbbbbbb-0000-0000-0000-000000000004"
slug = "frozen"
status = "Suspended"
allowed_origins = {origins}
"""
        + "\n\n".join(rows)
        + "\n"
    )
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    config = write_config(
        d / "edge.toml",
        tenancy={"embedded_file": str(tenants), "platform_domains": ["flatrender.test"]},
        upstreams={
            "render-api": {"urls": [echo.url]},
            "dead": {"urls": [dead], "connect_timeout_s": 1},
            "vary": {"urls": [vary_upstream]},
        },
        routes=[
            {
                "prefix": "/v1/renders",
                "upstream": "render-api",
                "auth": "api_key",
                "audit": False,
                "scopes": {"GET": "renders:read", "POST": "renders:create"},
            },
            {"prefix": "/embed/", "upstream": "render-api", "auth": "none", "embed": True},
            {"prefix": "/public", "upstream": "render-api", "auth": "none"},
            {"prefix": "/dead", "upstream": "dead", "auth": "none"},
            {"prefix": "/vary", "upstream": "vary", "auth": "none"},
        ],
    )
    config.write_text(config.read_text() + f'\n[audit]\njsonl_path = "{d / "audit.jsonl"}"\n')
    proxy = start_proxy(config)
    yield World(proxy, echo, keys)
    stop(proxy.proc)


# --- helpers -------------------------------------------------------------------------------


def req(
    world: World, path: str, *headers: str, host: str = ACME_HOST, method: str = "GET"
) -> RawResponse:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *headers, "Connection: close", "", ""]
    return raw_request(world.proxy.port, "\r\n".join(lines).encode())


def preflight(
    world: World,
    path: str,
    origin: str,
    *extra: str,
    host: str = ACME_HOST,
    method: str = "POST",
    headers: str | None = "Content-Type, X-Custom",
) -> RawResponse:
    lines = [f"Origin: {origin}", f"Access-Control-Request-Method: {method}", *extra]
    if headers is not None:
        lines.append(f"Access-Control-Request-Headers: {headers}")
    return req(world, path, *lines, host=host, method="OPTIONS")


def upstream_count(world: World, rid: str) -> int:
    with urllib.request.urlopen(f"{world.echo.url}/__count/{rid}", timeout=5) as r:
        count: int = json.loads(r.read())["count"]
        return count


def all_values(r: RawResponse, name: str) -> list[str]:
    return [v for k, v in r.headers if k.lower() == name.lower()]


def cors_headers(r: RawResponse) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in r.headers if k.lower().startswith("access-control-")]


def names(value: str | None) -> list[str]:
    return [n.strip().lower() for n in (value or "").split(",") if n.strip()]


def vary(r: RawResponse) -> list[str]:
    return [n for v in all_values(r, "Vary") for n in names(v)]


def error_code(r: RawResponse) -> str:
    assert (r.header("Content-Type") or "").startswith("application/json")
    code: str = json.loads(r.body)["error"]["code"]
    return code


def assert_actual_cors(r: RawResponse, origin: str) -> None:
    """The headers an allowed origin gets on any non-preflight answer, each exactly once."""
    got = dict(cors_headers(r))
    assert len(got) == len(cors_headers(r)), r.headers  # no duplicates
    assert got["access-control-allow-origin"] == origin
    assert got["access-control-allow-credentials"] == "true"
    assert set(names(got["access-control-expose-headers"])) >= EXPOSED
    assert "*" not in got.values()
    assert vary(r).count("origin") == 1


def assert_no_cors(r: RawResponse) -> None:
    assert cors_headers(r) == []
    assert vary(r).count("origin") == 1  # the answer would differ with another Origin


# --- preflight ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        "https://www.acme.test",
        "https://www.acme.test:443",  # default port, normalised away
        "HTTPS://WWW.ACME.TEST",
        "https://app.acme-studio.test",  # wildcard, one label
        "https://videos.acme.test",  # the tenant's custom domain
        "http://localhost:3000",
    ],
)
@pytest.mark.parametrize("path", ["/v1/renders", "/public/x"])
def test_allowed_preflight_is_answered_by_the_proxy(world: World, path: str, origin: str) -> None:
    rid = str(uuid.uuid4())
    r = preflight(world, path, origin, f"X-Request-Id: {rid}")  # no API key on /v1/renders
    assert r.status == 204
    assert r.body == b""
    got = dict(cors_headers(r))
    assert len(got) == len(cors_headers(r))
    assert set(got) == PREFLIGHT_HEADERS
    assert got["access-control-allow-origin"] == origin
    assert names(got["access-control-allow-methods"]) == ["post"]
    assert set(names(got["access-control-allow-headers"])) == {
        "content-type",
        "x-custom",
        "authorization",
    }
    assert got["access-control-allow-credentials"] == "true"
    assert got["access-control-max-age"] == "600"
    assert "*" not in got.values()
    assert "origin" in vary(r)
    assert r.header("X-Request-Id") == rid
    assert r.header("WWW-Authenticate") is None  # answered before authentication
    assert upstream_count(world, rid) == 0


def test_preflight_names_authorization_even_when_no_header_is_requested(world: World) -> None:
    r = preflight(world, "/v1/renders", ALLOWED, method="DELETE", headers=None)
    assert r.status == 204
    assert r.header("Access-Control-Allow-Methods") == "DELETE"
    assert names(r.header("Access-Control-Allow-Headers")) == ["authorization"]


def test_preflight_with_a_key_is_still_answered_by_the_proxy(world: World) -> None:
    rid = str(uuid.uuid4())
    r = preflight(
        world,
        "/v1/renders",
        ALLOWED,
        f"X-Request-Id: {rid}",
        f"Authorization: Bearer {world.keys['good']}",
        headers="Authorization",
    )
    assert r.status == 204
    assert r.header("X-RateLimit-Limit") is None  # never reached the rate limiter
    assert upstream_count(world, rid) == 0


def test_options_without_request_method_is_an_actual_request(world: World) -> None:
    """Control for the count checks: an OPTIONS that is not a preflight is forwarded."""
    rid = str(uuid.uuid4())
    r = req(world, "/public/x", f"Origin: {ALLOWED}", f"X-Request-Id: {rid}", method="OPTIONS")
    assert r.status == 200
    assert json.loads(r.body)["method"] == "OPTIONS"
    assert_actual_cors(r, ALLOWED)
    assert upstream_count(world, rid) == 1


@pytest.mark.parametrize(
    ("host", "origin"),
    [
        (ACME_HOST, "https://evil.test"),
        (ACME_HOST, "null"),
        (ACME_HOST, "https://a.b.acme-studio.test"),  # wildcard: two labels
        (ACME_HOST, "https://acme-studio.test"),  # wildcard: no label
        (ACME_HOST, "http://app.acme-studio.test"),  # wildcard: other scheme
        (ACME_HOST, "https://app.acme-studio.test:8443"),  # wildcard: other port
        (ACME_HOST, "http://videos.acme.test"),  # custom domain: https only
        (ACME_HOST, "https://www.acme.test:8443"),
        (ACME_HOST, "https://www.acme.test/path"),
        (ACME_HOST, "http://localhost:3001"),
        (ACME_HOST, "https://www.acme.test.evil.test"),
        ("bare.flatrender.test", "https://www.acme.test"),  # another tenant's origin
        ("bare.flatrender.test", "https://bare.flatrender.test"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/renders", "/public/x"])
def test_refused_preflight(world: World, path: str, host: str, origin: str) -> None:
    rid = str(uuid.uuid4())
    r = preflight(world, path, origin, f"X-Request-Id: {rid}", host=host)
    assert r.status == 403
    assert error_code(r) == "origin_not_allowed"
    assert json.loads(r.body)["error"]["request_id"] == rid
    assert_no_cors(r)
    assert upstream_count(world, rid) == 0


def test_malformed_preflight_is_refused_without_the_upstream(world: World) -> None:
    rid = str(uuid.uuid4())
    r = preflight(world, "/public/x", ALLOWED, f"X-Request-Id: {rid}", headers="Content Type")
    assert r.status == 400
    assert error_code(r) == "bad_request"
    assert upstream_count(world, rid) == 0


# --- actual requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin", ["https://www.acme.test", "https://app.acme-studio.test", "https://videos.acme.test"]
)
def test_allowed_origin_on_a_served_request(world: World, origin: str) -> None:
    r = req(world, "/public/x", f"Origin: {origin}")
    assert r.status == 200
    assert_actual_cors(r, origin)
    assert r.header("Access-Control-Allow-Methods") is None  # a preflight-only header


def test_allowed_origin_on_a_keyed_request(world: World) -> None:
    r = req(world, "/v1/renders/1", f"Origin: {ALLOWED}", f"X-API-Key: {world.keys['good']}")
    assert r.status == 200
    assert_actual_cors(r, ALLOWED)
    assert r.header("X-RateLimit-Limit") is not None  # what Expose-Headers makes readable


@pytest.mark.parametrize(
    ("host", "path", "headers", "status", "code"),
    [
        (ACME_HOST, "/v1/renders", (), 401, "missing_api_key"),
        (ACME_HOST, "/v1/renders", ("X-API-Key: " + mint(),), 401, "invalid_api_key"),
        (ACME_HOST, "/nowhere", (), 404, "no_route"),
        (ACME_HOST, "/dead/x", (), 502, "upstream_unavailable"),
        ("frozen.flatrender.test", "/public/x", (), 403, "tenant_suspended"),
    ],
)
def test_allowed_origin_on_proxy_errors(
    world: World, host: str, path: str, headers: tuple[str, ...], status: int, code: str
) -> None:
    r = req(world, path, f"Origin: {ALLOWED}", *headers, host=host)
    assert r.status == status
    assert error_code(r) == code
    assert_actual_cors(r, ALLOWED)


def test_allowed_origin_on_rate_limited_answers(world: World) -> None:
    key = f"X-API-Key: {world.keys['limited']}"  # 1 request a minute
    first = req(world, "/v1/renders/1", f"Origin: {ALLOWED}", key)
    second = req(world, "/v1/renders/1", f"Origin: {ALLOWED}", key)
    assert first.status == 200
    assert second.status == 429 and error_code(second) == "rate_limited"
    assert_actual_cors(first, ALLOWED)
    assert_actual_cors(second, ALLOWED)
    assert int(second.header("Retry-After") or 0) >= 1


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.test",
        "null",
        "https://a.b.acme-studio.test",
        "http://videos.acme.test",
        "https://www.acme.test:8443",
    ],
)
def test_refused_origin_is_served_without_cors_headers(world: World, origin: str) -> None:
    ok = req(world, "/public/x", f"Origin: {origin}")
    assert ok.status == 200
    assert_no_cors(ok)
    hop = req(world, "/public/hop", f"Origin: {origin}")  # upstream sends ACAO: *
    assert hop.status == 200
    assert_no_cors(hop)
    denied = req(world, "/v1/renders", f"Origin: {origin}")
    assert denied.status == 401 and error_code(denied) == "missing_api_key"
    assert_no_cors(denied)


def test_allowed_origin_of_another_tenant_gets_no_cors_headers(world: World) -> None:
    r = req(world, "/public/x", f"Origin: {ALLOWED}", host="bare.flatrender.test")
    assert r.status == 200
    assert_no_cors(r)


@pytest.mark.parametrize(
    ("path", "host", "status"),
    [
        ("/public/x", ACME_HOST, 200),
        ("/public/hop", ACME_HOST, 200),
        ("/v1/renders", ACME_HOST, 401),
        ("/nowhere", ACME_HOST, 404),
        ("/dead/x", ACME_HOST, 502),
        ("/public/x", "frozen.flatrender.test", 403),
    ],
)
def test_no_origin_gets_no_cors_headers_but_vary(
    world: World, path: str, host: str, status: int
) -> None:
    r = req(world, path, host=host)
    assert r.status == status
    assert_no_cors(r)


# --- upstream Access-Control-* and Vary ----------------------------------------------------


def test_upstream_cors_headers_are_replaced(world: World) -> None:
    r = req(world, "/public/hop", f"Origin: {ALLOWED}")
    assert r.status == 200 and r.body == b"hop"
    assert_actual_cors(r, ALLOWED)
    assert all_values(r, "Access-Control-Allow-Origin") == [ALLOWED]
    assert r.header("Access-Control-Allow-Methods") is None  # the upstream's, dropped
    assert r.header("X-Kept") == "yes"


def test_vary_is_merged_with_the_upstreams(world: World) -> None:
    r = req(world, "/public/hop", f"Origin: {ALLOWED}")
    assert sorted(vary(r)) == ["accept-encoding", "origin"]
    no_origin = req(world, "/public/hop")
    assert sorted(vary(no_origin)) == ["accept-encoding", "origin"]


def test_every_upstream_vary_line_is_kept(world: World) -> None:
    for origin in (ALLOWED, "https://evil.test"):
        r = req(world, "/vary/x", f"Origin: {origin}")
        assert r.status == 200
        assert sorted(vary(r)) == ["accept-encoding", "accept-language", "origin"]


def test_upstream_vary_star_stays_star(world: World) -> None:
    r = req(world, "/vary/star", f"Origin: {ALLOWED}")
    assert r.status == 200
    assert vary(r) == ["*"]  # already varies on everything, Origin included
    assert all_values(r, "Access-Control-Allow-Origin") == [ALLOWED]
    assert all_values(r, "Access-Control-Allow-Credentials") == ["true"]


def test_upstream_cors_headers_of_any_case_are_replaced(world: World) -> None:
    allowed = req(world, "/vary/x", f"Origin: {ALLOWED}")
    assert_actual_cors(allowed, ALLOWED)
    assert "x-internal-secret" not in names(allowed.header("Access-Control-Expose-Headers"))
    refused = req(world, "/vary/x", "Origin: https://evil.test")
    assert cors_headers(refused) == []


# --- embeds -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "policy"),
    [
        (ACME_HOST, "frame-ancestors https://www.acme.test"),
        ("noembed.flatrender.test", "frame-ancestors 'self'"),  # embed_enabled = false
        ("bare.flatrender.test", "frame-ancestors 'self'"),  # no branding at all
    ],
)
def test_embed_route_frame_ancestors(world: World, host: str, policy: str) -> None:
    r = req(world, "/embed/player/1", host=host)
    assert r.status == 200
    assert all_values(r, "Content-Security-Policy") == [policy]


@pytest.mark.parametrize(
    ("path", "status"), [("/public/x", 200), ("/v1/renders", 401), ("/dead/x", 502)]
)
def test_other_routes_carry_no_frame_ancestors(world: World, path: str, status: int) -> None:
    r = req(world, path, f"Origin: {ALLOWED}")
    assert r.status == status
    assert not any("frame-ancestors" in v for v in all_values(r, "Content-Security-Policy"))
