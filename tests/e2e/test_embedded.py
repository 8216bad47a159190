"""The embedded default through a real proxy process: tenants and keys from a TOML file,
in-process buckets, audit rows to a JSON-lines file (CONTRACT §3, §5, §6, §9)."""

from __future__ import annotations

import hashlib
import json
import secrets
import signal
import string
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import Echo, Proxy, raw_request, start_proxy, stop, write_config

ALPHABET = string.ascii_letters + string.digits
ACME = "aaaaaaaa-0000-0000-0000-000000000001"
GLOBEX = "aaaaaaaa-0000-0000-0000-000000000002"
DEFAULT = "00000000-0000-0000-0000-000000000001"


def mint(env: str = "live") -> str:
    return f"fr_{env}_" + "".join(secrets.choice(ALPHABET) for _ in range(40))


@dataclass
class World:
    proxy: Proxy
    audit: Path
    keys: dict[str, str]


def _key_row(name: str, key: str, tenant: str, **extra: object) -> str:
    lines = [
        "[[keys]]",
        f'id = "{uuid.uuid5(uuid.NAMESPACE_DNS, name)}"',
        f'tenant = "{tenant}"',
        f'key_prefix = "{key[:12]}"',
        f'key_hash = "{hashlib.sha256(key.encode()).hexdigest()}"',
    ]
    for k, v in extra.items():
        lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def world(echo: Echo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    d = tmp_path_factory.mktemp("embedded")
    keys = {
        name: mint()
        for name in (
            "good",
            "expired",
            "revoked",
            "inactive",
            "globex",
            "narrow",
            "iplocked",
            "ipopen",
            "limited",
        )
    }
    keys["test"] = mint("test")
    rows = [
        _key_row("good", keys["good"], "acme", scopes=["renders:*"]),
        _key_row("test", keys["test"], "acme", scopes=["*"]),
        _key_row(
            "expired", keys["expired"], "acme", scopes=["*"], expires_at="2020-01-01T00:00:00+00:00"
        ),
        _key_row(
            "revoked", keys["revoked"], "acme", scopes=["*"], revoked_at="2026-01-01T00:00:00+00:00"
        ),
        _key_row("inactive", keys["inactive"], "acme", scopes=["*"], is_active=False),
        _key_row("globex", keys["globex"], "globex", scopes=["*"]),
        _key_row("narrow", keys["narrow"], "acme", scopes=["renders:read"]),
        _key_row("iplocked", keys["iplocked"], "acme", scopes=["*"], allowed_ips=["10.0.0.0/8"]),
        _key_row(
            "ipopen", keys["ipopen"], "acme", scopes=["*"], allowed_ips=["127.0.0.1/32", "::1/128"]
        ),
        _key_row("limited", keys["limited"], "acme", scopes=["*"], rate_limit_rpm=3),
    ]
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
custom_domain = "videos.acme.test"
domain_verified = true

[[tenants]]
id = "{GLOBEX}"
slug = "globex"
status = "Trial"
trial_ends_at = "2999-01-01T00:00:00+00:00"
custom_domain = "videos.globex.test"
domain_verified = false

[[tenants]]
id = "aaaaaaaa-0000-0000-0000-000000000003"
slug = "lapsed"
status = "Trial"
trial_ends_at = "2020-01-01T00:00:00+00:00"

[[tenants]]
id = "aaaaaaaa-0000-0000-0000-000000000004"
slug = "frozen"
status = "Suspended"

[[tenants]]
id = "aaaaaaaa-0000-0000-0000-000000000005"
slug = "gone"
status = "Cancelled"
"""
        + "\n\n".join(rows)
        + "\n"
    )
    audit = d / "audit.jsonl"
    config = write_config(
        d / "edge.toml",
        tenancy={"embedded_file": str(tenants), "platform_domains": ["flatrender.test"]},
        upstreams={"render-api": {"urls": [echo.url]}},
        routes=[
            {
                "prefix": "/v1/renders",
                "upstream": "render-api",
                "auth": "api_key",
                "audit": True,
                "scopes": {"GET": "renders:read", "POST": "renders:create"},
            },
            {
                "prefix": "/v1/admin",
                "upstream": "render-api",
                "auth": "api_key",
                "scopes": {"GET": "admin:read"},
            },
            {"prefix": "/v1/optional", "upstream": "render-api", "auth": "optional"},
        ],
    )
    text = config.read_text() + f'\n[audit]\njsonl_path = "{audit}"\nflush_interval_ms = 50\n'
    config.write_text(text)
    p = start_proxy(config)
    yield World(p, audit, keys)
    stop(p.proc)


def req(world: World, path: str, host: str, *headers: str, method: str = "GET"):  # type: ignore[no-untyped-def]
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *headers, "Connection: close", "", ""]
    return raw_request(world.proxy.port, "\r\n".join(lines).encode())


def code(r) -> str:  # type: ignore[no-untyped-def]
    c: str = json.loads(r.body)["error"]["code"]
    return c


@pytest.mark.parametrize(
    ("host", "status", "error"),
    [
        ("videos.acme.test", 401, "missing_api_key"),
        ("VIDEOS.ACME.TEST.:443", 401, "missing_api_key"),
        ("acme.flatrender.test", 401, "missing_api_key"),
        ("videos.globex.test", 421, "domain_not_verified"),
        ("lapsed.flatrender.test", 402, "trial_expired"),
        ("frozen.flatrender.test", 403, "tenant_suspended"),
        ("gone.flatrender.test", 410, "tenant_cancelled"),
        ("nobody.flatrender.test", 404, "unknown_host"),
        ("a.acme.flatrender.test", 404, "unknown_host"),
    ],
)
def test_tenant_resolution_and_status(world: World, host: str, status: int, error: str) -> None:
    r = req(world, "/v1/renders", host)
    assert r.status == status and code(r) == error


def test_missing_key_names_the_bearer_scheme(world: World) -> None:
    r = req(world, "/v1/renders", "videos.acme.test")
    assert r.header("WWW-Authenticate") == "Bearer"


@pytest.mark.parametrize(
    ("key_name", "header", "path", "status", "error"),
    [
        ("good", "Authorization: Bearer {}", "/v1/renders/1", 200, None),
        ("good", "X-API-Key: {}", "/v1/renders/1", 200, None),
        ("good", "authorization: bearer {}", "/v1/renders/1", 200, None),
        ("test", "X-API-Key: {}", "/v1/renders/1", 200, None),
        ("expired", "X-API-Key: {}", "/v1/renders/1", 401, "api_key_expired"),
        ("revoked", "X-API-Key: {}", "/v1/renders/1", 401, "api_key_revoked"),
        ("inactive", "X-API-Key: {}", "/v1/renders/1", 401, "api_key_revoked"),
        ("globex", "X-API-Key: {}", "/v1/renders/1", 403, "tenant_mismatch"),
        ("narrow", "X-API-Key: {}", "/v1/admin/x", 403, "insufficient_scope"),
        ("good", "X-API-Key: {}", "/v1/admin/x", 403, "insufficient_scope"),
        ("iplocked", "X-API-Key: {}", "/v1/renders/1", 403, "ip_not_allowed"),
        ("ipopen", "X-API-Key: {}", "/v1/renders/1", 200, None),
    ],
)
def test_key_outcomes(
    world: World, key_name: str, header: str, path: str, status: int, error: str | None
) -> None:
    r = req(world, path, "videos.acme.test", header.format(world.keys[key_name]))
    assert r.status == status
    if error:
        assert code(r) == error
    else:
        echoed = json.loads(r.body)
        assert world.keys[key_name] not in r.body.decode()
        env = "test" if key_name == "test" else "live"
        assert ["X-FlatRender-Key-Environment", env] in echoed["headers"]


def test_unknown_and_wrong_keys_look_the_same(world: World) -> None:
    good = world.keys["good"]
    wrong_secret = good[:12] + ("A" if good[12] != "A" else "B") + good[13:]
    for key in (mint(), wrong_secret, "fr_live_short", "fr_nope_" + "a" * 40):
        r = req(world, "/v1/renders", "videos.acme.test", f"X-API-Key: {key}")
        assert r.status == 401 and code(r) == "invalid_api_key"


def test_a_malformed_bearer_key_is_invalid_and_every_401_names_bearer(world: World) -> None:
    """CONTRACT §5: a key header that is not a well-formed key is an invalid key, on every
    route that reads keys; RFC 6750 §3: every 401 carries the Bearer challenge."""
    for path in ("/v1/renders/1", "/v1/optional/x"):
        for value in ("Bearer not-a-key", "Bearer studio.jwt.token", "Bearer"):
            r = req(world, path, "videos.acme.test", f"Authorization: {value}")
            assert (r.status, code(r)) == (401, "invalid_api_key"), (path, value)
            assert r.header("WWW-Authenticate") == "Bearer"
    r = req(world, "/v1/renders/1", "videos.acme.test")
    assert (r.status, code(r), r.header("WWW-Authenticate")) == (401, "missing_api_key", "Bearer")


def test_a_non_key_bearer_next_to_a_key_is_the_upstreams(world: World) -> None:
    r = req(
        world,
        "/v1/optional/x",
        "videos.acme.test",
        "Authorization: Bearer studio.jwt.token",
        f"X-API-Key: {world.keys['good']}",
    )
    assert r.status == 200
    assert ["Authorization", "Bearer studio.jwt.token"] in json.loads(r.body)["headers"]


def test_platform_domain_adopts_the_keys_tenant(world: World) -> None:
    r = req(world, "/v1/renders/1", "flatrender.test", f"X-API-Key: {world.keys['good']}")
    assert r.status == 200
    assert ["X-FlatRender-Tenant-Id", ACME] in json.loads(r.body)["headers"]


def test_rate_limit_headers_and_429(world: World) -> None:
    key = f"X-API-Key: {world.keys['limited']}"
    seen = [req(world, "/v1/renders/1", "videos.acme.test", key) for _ in range(4)]
    assert [r.status for r in seen] == [200, 200, 200, 429]
    assert [r.header("X-RateLimit-Remaining") for r in seen[:3]] == ["2", "1", "0"]
    assert all(r.header("X-RateLimit-Limit") == "3" for r in seen)
    assert seen[0].header("RateLimit-Policy") == '"key";q=3;w=60'
    assert seen[0].header("RateLimit") == f'"key";r=2;t={seen[0].header("X-RateLimit-Reset")}'
    limited = seen[3]
    assert code(limited) == "rate_limited"
    assert int(limited.header("Retry-After") or 0) >= 1


def _audit_rows(
    path: Path, request_ids: set[str], deadline_s: float = 5.0
) -> list[dict[str, object]]:
    end = time.monotonic() + deadline_s
    while True:
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        found = [r for r in rows if r["request_id"] in request_ids]
        if len({r["request_id"] for r in found}) == len(request_ids) or time.monotonic() > end:
            return found
        time.sleep(0.05)


def test_audit_rows_for_served_and_rejected_requests(world: World) -> None:
    ids = {name: str(uuid.uuid4()) for name in ("ok", "denied", "unaudited")}
    ok = req(
        world,
        "/v1/renders/9?secret=1",
        "videos.acme.test",
        f"X-Request-Id: {ids['ok']}",
        f"X-API-Key: {world.keys['good']}",
        "User-Agent: acme-backend/1.0",
    )
    denied = req(world, "/v1/renders", "videos.acme.test", f"X-Request-Id: {ids['denied']}")
    req(world, "/v1/optional/x", "videos.acme.test", f"X-Request-Id: {ids['unaudited']}")
    assert ok.status == 200 and denied.status == 401
    rows = {r["request_id"]: r for r in _audit_rows(world.audit, {ids["ok"], ids["denied"]})}
    assert rows[ids["ok"]]["status_code"] == 200
    assert rows[ids["ok"]]["path"] == "/v1/renders/9"
    assert rows[ids["ok"]]["tenant_id"] == ACME
    assert rows[ids["ok"]]["api_key_id"] == str(uuid.uuid5(uuid.NAMESPACE_DNS, "good"))
    assert rows[ids["ok"]]["user_agent"] == "acme-backend/1.0"
    assert rows[ids["ok"]]["ip_address"] == "127.0.0.1"
    assert rows[ids["ok"]]["error_message"] is None
    assert rows[ids["denied"]]["status_code"] == 401
    assert rows[ids["denied"]]["error_message"] == "missing_api_key"
    text = world.audit.read_text()
    assert ids["unaudited"] not in text  # route without audit = true
    assert world.keys["good"] not in text
    assert sum(1 for line in text.splitlines() if ids["ok"] in line) == 1


def test_sigterm_writes_pending_audit_rows(echo: Echo, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    config = write_config(
        tmp_path / "edge.toml",
        upstreams={"render-api": {"urls": [echo.url]}},
        routes=[{"prefix": "/public", "upstream": "render-api", "auth": "none", "audit": True}],
    )
    # A flush interval far beyond the test: only the shutdown drain can write these rows.
    config.write_text(
        config.read_text() + f'\n[audit]\njsonl_path = "{audit}"\nflush_interval_ms = 3600000\n'
    )
    proxy = start_proxy(config)
    ids = [str(uuid.uuid4()) for _ in range(20)]
    for rid in ids:
        lines = [
            "GET /public/x HTTP/1.1",
            "Host: flatrender.test",
            f"X-Request-Id: {rid}",
            "Connection: close",
            "",
            "",
        ]
        assert raw_request(proxy.port, "\r\n".join(lines).encode()).status == 200
    assert not audit.exists() or not audit.read_text()
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(15) == 0
    written = [json.loads(line)["request_id"] for line in audit.read_text().splitlines()]
    assert sorted(written) == sorted(ids)
