"""proxy.settings: the configuration of CONTRACT §2, validated up front.

Every bad input is a ``ConfigError`` whose message names the key, so the CLI prints one line;
a file with several problems is one ``ConfigError`` holding all of them, one line each.
"""

from __future__ import annotations

import copy
import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest

from proxy.settings import (
    DEFAULT_CONFIG,
    ConfigError,
    HostPort,
    Settings,
    load_settings,
    parse_settings,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "edge.toml"

MINIMAL: dict[str, Any] = {
    "upstreams": {"render-api": {"urls": ["http://127.0.0.1:9001"]}},
    "routes": [{"prefix": "/v1/renders", "upstream": "render-api"}],
}


def _parse(data: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Settings:
    return parse_settings(MINIMAL if data is None else data, env or {}, Path("edge.toml"))


def _with(path: str, value: Any) -> dict[str, Any]:
    """MINIMAL with ``value`` set at a dotted path ("routes.0.auth", "server.listen")."""
    data = copy.deepcopy(MINIMAL)
    node: Any = data
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


# --------------------------------------------------------------------------- the shipped file


def test_shipped_config_loads() -> None:
    s = load_settings({}, str(SHIPPED))
    assert s.config_path == SHIPPED
    assert s.server.listen == HostPort("127.0.0.1", 8080)
    assert s.server.admin_listen == HostPort("127.0.0.1", 9901)
    assert s.server.trusted_proxies == (ipaddress.ip_network("127.0.0.1/32"),)
    assert s.server.max_body_bytes == 104_857_600
    assert s.server.header_timeout_s == 10
    assert s.server.body_timeout_s == 60
    assert s.tenancy.platform_domains == ("flatrender.test",)
    assert s.tenancy.embedded_file == Path("config/tenants.toml")
    assert s.tenancy.max_miss_lookups_per_s == 200
    assert s.tenancy.preload_max_entries == 2_000_000
    assert s.ratelimit.failure_mode == "open"
    assert s.audit.flush_interval_ms == 500
    assert s.audit.spool_dir == Path("var/spool")
    assert set(s.upstreams) == {"render-api"}
    api = s.upstreams["render-api"]
    assert (api.urls, api.connect_timeout_s, api.read_timeout_s) == (
        ("http://127.0.0.1:9001",),
        2,
        60,
    )
    by_prefix = {r.prefix: r for r in s.routes}
    assert set(by_prefix) == {"/v1/renders", "/embed/", "/public"}
    renders = by_prefix["/v1/renders"]
    assert renders.auth == "api_key" and renders.audit and renders.meter == "renders"
    assert dict(renders.scopes) == {
        "GET": "renders:read",
        "POST": "renders:create",
        "DELETE": "renders:delete",
    }
    assert by_prefix["/embed/"].embed and by_prefix["/embed/"].auth == "none"
    # no environment: embedded mode, in-process buckets
    assert (s.database_url, s.redis_url, s.redis_mode) == (None, None, "standalone")


def test_default_config_path_is_the_shipped_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert DEFAULT_CONFIG == "config/edge.toml"
    assert load_settings({}).config_path == Path(DEFAULT_CONFIG)


def test_defaults_for_an_empty_file() -> None:
    s = _parse({})
    assert s.routes == () and dict(s.upstreams) == {}
    assert s.server.listen == HostPort("0.0.0.0", 8080)
    assert s.server.admin_listen == HostPort("127.0.0.1", 9901)
    assert s.ratelimit.failure_mode == "open" and not s.ratelimit.shadow


def test_route_defaults() -> None:
    (route,) = _parse().routes
    assert (route.auth, dict(route.scopes), route.audit, route.embed) == (
        "api_key",
        {},
        False,
        False,
    )


def test_metered_route() -> None:
    data = _with("routes.0.meter", "renders")
    data["routes"][0]["audit"] = True
    (route,) = _parse(data).routes
    assert route.meter == "renders"
    assert _parse().routes[0].meter is None
    assert _parse().ratelimit.quota_lease_s == 900


@pytest.mark.parametrize(
    ("lease_s", "read_timeout_s", "meter", "refused"),
    [
        (60, 60, "renders", True),  # the lease may end while the upstream still answers
        (30, 60, "renders", True),
        (61, 60, "renders", False),
        (30, 60, None, False),  # no metered route: no reservation to hold
    ],
)
def test_the_quota_lease_outlasts_a_metered_routes_read_timeout(
    lease_s: int, read_timeout_s: int, meter: str | None, refused: bool
) -> None:
    data = _with("ratelimit.quota_lease_s", lease_s)
    data["upstreams"]["render-api"]["read_timeout_s"] = read_timeout_s
    if meter is not None:
        data["routes"][0].update(meter=meter, audit=True)
    if not refused:
        assert _parse(data).ratelimit.quota_lease_s == lease_s
        return
    with pytest.raises(ConfigError) as raised:
        _parse(data)
    assert raised.value.problems == (
        f"ratelimit.quota_lease_s: {lease_s} must be above the longest read_timeout_s"
        f" of a metered route's upstream ({read_timeout_s})",
    )


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("0.0.0.0:8080", HostPort("0.0.0.0", 8080)),
        ("localhost:1", HostPort("localhost", 1)),
        ("[::]:8080", HostPort("::", 8080)),
        ("[::1]:65535", HostPort("::1", 65535)),
    ],
)
def test_listen(listen: str, expected: HostPort) -> None:
    assert _parse(_with("server.listen", listen)).server.listen == expected


def test_host_port_prints_brackets_for_ipv6() -> None:
    assert str(HostPort("::1", 80)) == "[::1]:80"
    assert str(HostPort("127.0.0.1", 80)) == "127.0.0.1:80"


@pytest.mark.parametrize(
    ("domains", "expected"),
    [
        (["FlatRender.TEST."], ("flatrender.test",)),
        (["flatrender.test", "eu.flatrender.test"], ("flatrender.test", "eu.flatrender.test")),
        # the Host's normal form, or a Unicode platform domain would never match a request
        (["Bücher.test"], ("xn--bcher-kva.test",)),
    ],
)
def test_platform_domains_are_normalised_like_hosts(
    domains: list[str], expected: tuple[str, ...]
) -> None:
    assert _parse(_with("tenancy.platform_domains", domains)).tenancy.platform_domains == expected


def test_upstream_url_is_normalised_to_scheme_and_authority() -> None:
    data = _with("upstreams.render-api.urls", ["https://api.internal:8443/", "http://[::1]:9001"])
    assert _parse(data).upstreams["render-api"].urls == (
        "https://api.internal:8443",
        "http://[::1]:9001",
    )


def test_trusted_proxies_accept_v4_v6_and_host_bits() -> None:
    data = _with("server.trusted_proxies", ["10.0.0.0/8", "2001:db8::/32", "192.168.1.7/24", "::1"])
    assert _parse(data).server.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("192.168.1.0/24"),
        ipaddress.ip_network("::1/128"),
    )


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("data", "key"),
    [
        # unknown route upstream
        (_with("routes.0.upstream", "nope"), "routes[0].upstream"),
        # malformed upstream URLs
        (_with("upstreams.render-api.urls", ["127.0.0.1:9001"]), "upstreams.render-api.urls"),
        (_with("upstreams.render-api.urls", ["localhost:9001"]), "upstreams.render-api.urls"),
        (_with("upstreams.render-api.urls", ["http://h:1/api"]), "upstreams.render-api.urls"),
        (_with("upstreams.render-api.urls", ["http://h:1?x=1"]), "upstreams.render-api.urls"),
        (_with("upstreams.render-api.urls", ["http://h:1/#f"]), "upstreams.render-api.urls"),
        (_with("upstreams.render-api.urls", ["ftp://h:1"]), "upstreams.render-api.urls"),
        (_with("upstreams.render-api.urls", ["http://:1"]), "upstreams.render-api.urls"),
        (_with("upstreams.render-api.urls", ["http://h:99999"]), "upstreams.render-api.urls"),
        (_with("upstreams.render-api.urls", ["http://h:port"]), "upstreams.render-api.urls"),
        (_with("upstreams.render-api.urls", []), "upstreams.render-api.urls"),
        (_with("upstreams.render-api.urls", "http://h:1"), "upstreams.render-api.urls"),
        # bad CIDR
        (_with("server.trusted_proxies", ["10.0.0.0/33"]), "server.trusted_proxies"),
        (_with("server.trusted_proxies", ["localhost"]), "server.trusted_proxies"),
        (_with("server.trusted_proxies", ["10.0.0.1", ""]), "server.trusted_proxies"),
        (_with("server.trusted_proxies", "127.0.0.1/32"), "server.trusted_proxies"),
        # bad listen
        (_with("server.listen", "8080"), "server.listen"),
        (_with("server.listen", ":8080"), "server.listen"),
        (_with("server.listen", "0.0.0.0:"), "server.listen"),
        (_with("server.listen", "0.0.0.0:0"), "server.listen"),
        (_with("server.listen", "0.0.0.0:65536"), "server.listen"),
        (_with("server.listen", "0.0.0.0:http"), "server.listen"),
        (_with("server.listen", 8080), "server.listen"),
        (_with("server.admin_listen", "[::1]"), "server.admin_listen"),
        # negative, zero or non-numeric timeouts and sizes
        (_with("server.header_timeout_s", -1), "server.header_timeout_s"),
        (_with("server.header_timeout_s", 0), "server.header_timeout_s"),
        (_with("server.header_timeout_s", "10"), "server.header_timeout_s"),
        (_with("server.header_timeout_s", True), "server.header_timeout_s"),
        (_with("server.body_timeout_s", 0), "server.body_timeout_s"),
        (_with("server.body_timeout_s", "60"), "server.body_timeout_s"),
        (_with("upstreams.render-api.read_timeout_s", -5), "upstreams.render-api.read_timeout_s"),
        (
            _with("upstreams.render-api.connect_timeout_s", 0.0),
            "upstreams.render-api.connect_timeout_s",
        ),
        (_with("server.max_body_bytes", 1.5), "server.max_body_bytes"),
        (_with("server.max_body_bytes", -1), "server.max_body_bytes"),
        (_with("audit.flush_interval_ms", 0), "audit.flush_interval_ms"),
        (_with("tenancy.cache_ttl_s", -30), "tenancy.cache_ttl_s"),
        (_with("tenancy.max_miss_lookups_per_s", 0), "tenancy.max_miss_lookups_per_s"),
        (_with("tenancy.max_miss_lookups_per_s", 2.5), "tenancy.max_miss_lookups_per_s"),
        (_with("tenancy.preload_max_entries", -1), "tenancy.preload_max_entries"),
        (_with("tenancy.preload_max_entries", True), "tenancy.preload_max_entries"),
        # unknown keys (typos) at every level
        (_with("servr", {"listen": "0.0.0.0:8080"}), "servr"),
        (_with("database_url", "postgresql://x/y"), "database_url"),
        (_with("server.listn", "0.0.0.0:8080"), "server.listn"),
        (_with("ratelimit.failure", "open"), "ratelimit.failure"),
        (_with("upstreams.render-api.read_timout_s", 5), "upstreams.render-api.read_timout_s"),
        (_with("routes.0.scope", {"GET": "renders:read"}), "routes[0].scope"),
        (_with("routes.0.audti", True), "routes[0].audti"),
        (_with("routes.0.scopes", {"GET": "renders:read", "FETCH": "x"}), "routes[0].scopes.FETCH"),
        (_with("routes.0.scopes", {"get": "renders:read"}), "routes[0].scopes.get"),
        # duplicate route prefix
        (
            _with(
                "routes",
                [
                    {"prefix": "/v1", "upstream": "render-api"},
                    {"prefix": "/v1", "upstream": "render-api", "auth": "none"},
                ],
            ),
            "routes[1].prefix",
        ),
        # wrong types and values
        (_with("server", "0.0.0.0:8080"), "server"),
        (_with("upstreams.render-api", ["http://h:1"]), "upstreams.render-api"),
        (_with("routes", {"prefix": "/v1", "upstream": "render-api"}), "routes"),
        (_with("routes", ["/v1"]), "routes[0]"),
        (_with("routes.0.prefix", "v1/renders"), "routes[0].prefix"),
        (_with("routes.0.prefix", ""), "routes[0].prefix"),
        (_with("routes.0.auth", "apikey"), "routes[0].auth"),
        (_with("routes.0.audit", "yes"), "routes[0].audit"),
        (_with("routes.0.scopes", "renders:read"), "routes[0].scopes"),
        (_with("routes.0.scopes", {"GET": ""}), "routes[0].scopes.GET"),
        (_with("ratelimit.failure_mode", "fail-open"), "ratelimit.failure_mode"),
        (_with("ratelimit.shadow", 1), "ratelimit.shadow"),
        (_with("tenancy.platform_domains", "flatrender.test"), "tenancy.platform_domains"),
        (_with("tenancy.platform_domains", ["flatrender..test"]), "tenancy.platform_domains"),
        (_with("tenancy.platform_domains", ["*.flatrender.test"]), "tenancy.platform_domains"),
        (_with("audit.spool_dir", ""), "audit.spool_dir"),
        # render metering: a known meter, on an audited route (renders_started is written
        # with the audit rows)
        (_with("routes.0.meter", "render"), "routes[0].meter"),
        (_with("routes.0.meter", True), "routes[0].meter"),
        (_with("routes.0.meter", "renders"), "routes[0].meter"),
        (_with("ratelimit.quota_lease_s", 0), "ratelimit.quota_lease_s"),
        (_with("ratelimit.quota_lease_s", 1.5), "ratelimit.quota_lease_s"),
    ],
)
def test_bad_file_input_names_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _parse(data)
    message = str(caught.value)
    assert message.startswith(f"{key}:"), message
    assert "\n" not in message


def test_every_problem_of_the_file_is_reported_once() -> None:
    data: dict[str, Any] = {
        "server": {"listen": "0.0.0.0:http", "max_body_bytes": "big", "colour": "blue"},
        "tenancy": {"platform_domains": ["bad..name"], "cache_ttl": 3},
        "ratelimit": {"failure_mode": "sometimes"},
        "audit": "none",
        "upstreams": {
            # a bad upstream keeps its name: the route naming it is not reported as well
            "render-api": {"urls": ["127.0.0.1:9001"], "read_timout_s": 3},
        },
        "routes": [
            {"prefix": "v1", "upstream": "nope", "meter": "minutes"},
            {"prefix": "/x", "upstream": "render-api", "scopes": {"FETCH": "x:y"}},
            {"prefix": "/x", "upstream": "render-api"},
        ],
        "extra": 1,
    }
    env = {"REDIS_MODE": "clustered", "DATABASE_URL": "mysql://db/x"}
    with pytest.raises(ConfigError) as caught:
        _parse(data, env)
    assert caught.value.problems == (
        "server.listen: expected HOST:PORT, got '0.0.0.0:http'",
        "server.max_body_bytes: expected a positive integer, got 'big'",
        "server.colour: unknown key",
        "tenancy.platform_domains: not a host name: 'bad..name'",
        "tenancy.cache_ttl: unknown key",
        'ratelimit.failure_mode: expected "open" or "closed", got \'sometimes\'',
        "audit: expected a table",
        "upstreams.render-api.urls: not an http(s) URL: '127.0.0.1:9001'",
        "upstreams.render-api.read_timout_s: unknown key",
        "routes[0].prefix: must start with '/', got 'v1'",
        "routes[0].upstream: unknown upstream 'nope'",
        "routes[0].meter: expected \"renders\", got 'minutes'",
        "routes[1].scopes.FETCH: not an HTTP method",
        "routes[2].prefix: duplicate prefix '/x'",
        "extra: unknown key",
        "REDIS_MODE: expected standalone, cluster or sentinel, got 'clustered'",
        "DATABASE_URL: not a postgresql:// URL",
    )
    assert str(caught.value) == "\n".join(caught.value.problems)


def test_every_problem_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text('[server]\nlisten = 1\nlisen = "x"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings({}, str(path))
    assert caught.value.problems == (
        f"{path}: server.listen: expected a string, got 1",
        f"{path}: server.lisen: unknown key",
    )


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"REDIS_MODE": "clustered"}, "REDIS_MODE"),
        ({"REDIS_MODE": "Sentinel"}, "REDIS_MODE"),
        ({"REDIS_MODE": "sentinel"}, "REDIS_SENTINEL_SERVICE"),
        ({"REDIS_MODE": "sentinel", "REDIS_SENTINEL_SERVICE": ""}, "REDIS_SENTINEL_SERVICE"),
        ({"DATABASE_URL": "mysql://db/identity"}, "DATABASE_URL"),
        ({"DATABASE_URL": "db.internal:5432"}, "DATABASE_URL"),
        ({"REDIS_URL": "http://cache:6379"}, "REDIS_URL"),
        ({"REDIS_URL": "cache:6379"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://"}, "REDIS_URL"),
        ({"REDIS_URL": "unix:///run/redis.sock"}, "REDIS_URL"),
        # Options the limiter's own client would not apply stop the start (not ignored).
        ({"REDIS_URL": "redis://r:6379/0?socket_timeout=5"}, "REDIS_URL: URL options"),
        ({"REDIS_URL": "redis://r:6379/cache"}, "REDIS_URL: the path names a database"),
        ({"REDIS_URL": "redis://r:port/0"}, "REDIS_URL: the port"),
        ({"OTEL_SDK_DISABLED": "yes"}, "OTEL_SDK_DISABLED"),
        ({"OTEL_SDK_DISABLED": "1"}, "OTEL_SDK_DISABLED"),
    ],
)
def test_bad_environment_names_the_variable(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _parse(env=env)
    assert str(caught.value).startswith(key if ":" in key else f"{key}:"), str(caught.value)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (None, None, "standalone", None)),
        # an empty variable is an unset one
        ({"DATABASE_URL": "", "REDIS_URL": ""}, (None, None, "standalone", None)),
        (
            {
                "DATABASE_URL": "postgresql://u:p@db:5432/flatrender",
                "REDIS_URL": "redis://r:6379/0",
            },
            ("postgresql://u:p@db:5432/flatrender", "redis://r:6379/0", "standalone", None),
        ),
        (
            {"DATABASE_URL": "postgres://db/x", "REDIS_URL": "rediss://r:6380"},
            ("postgres://db/x", "rediss://r:6380", "standalone", None),
        ),
        (
            {"REDIS_URL": "redis://node-1:7000", "REDIS_MODE": "cluster"},
            (None, "redis://node-1:7000", "cluster", None),
        ),
        (
            {
                "REDIS_URL": "redis://sentinel:26379",
                "REDIS_MODE": "sentinel",
                "REDIS_SENTINEL_SERVICE": "mymaster",
            },
            (None, "redis://sentinel:26379", "sentinel", "mymaster"),
        ),
    ],
)
def test_environment(env: dict[str, str], expected: tuple[object, ...]) -> None:
    s = _parse(env=env)
    assert (s.database_url, s.redis_url, s.redis_mode, s.redis_sentinel_service) == expected


@pytest.mark.parametrize(
    ("value", "disabled"),
    [(None, False), ("", False), ("false", False), ("true", True), (" TRUE ", True)],
)
def test_otel_sdk_disabled(value: str | None, disabled: bool) -> None:
    env = {} if value is None else {"OTEL_SDK_DISABLED": value}
    assert _parse(env=env).telemetry.sdk_disabled is disabled


# --------------------------------------------------------------------------- load_settings


def _write(tmp_path: Path, text: str, name: str = "edge.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server\nlisten = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_settings({}, str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: invalid TOML")
    assert "\n" not in message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: configuration file not found"):
        load_settings({}, str(path))


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings({}, str(tmp_path))  # a directory


def test_file_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, '[server]\nlisten = "0.0.0.0:http"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings({}, str(path))
    assert str(caught.value).startswith(f"{path}: server.listen:")


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    chosen = _write(tmp_path, '[server]\nlisten = "127.0.0.1:1111"\n', "chosen.toml")
    flag = _write(tmp_path, '[server]\nlisten = "127.0.0.1:2222"\n', "flag.toml")
    env = {
        "EDGE_CONFIG": str(chosen),
        "DATABASE_URL": "postgresql://db/x",
        "REDIS_URL": "redis://r",
    }
    # EDGE_CONFIG picks the file; DATABASE_URL and REDIS_URL come from the environment only
    s = load_settings(env)
    assert s.config_path == chosen and s.server.listen.port == 1111
    assert (s.database_url, s.redis_url) == ("postgresql://db/x", "redis://r")
    # --config (the argument) wins over EDGE_CONFIG
    assert load_settings(env, str(flag)).server.listen.port == 2222


def test_load_settings_reads_only_the_environment_it_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://not/read")
    monkeypatch.setenv("REDIS_MODE", "bogus")
    s = load_settings({}, str(SHIPPED))
    assert s.database_url is None and s.redis_mode == "standalone"
    assert os.environ["REDIS_MODE"] == "bogus"
