"""Settings from the environment and the TOML file (CONTRACT §2), validated once at start-up.

Every problem is a line that names the offending key; ``parse_settings`` reads the whole file
and raises one ``ConfigError`` holding every problem it found (``nginx -t`` and ``caddy
validate`` stop at the first; an operator fixing a file wants them all at once), so the CLI
prints one line per problem and exits non-zero. A key with a problem is reported once, and a
table that is not a table once, not again for every key read from it. Unknown keys are errors
too: a typo such as ``read_timout_s`` must not silently fall back to a default (Envoy rejects
unknown fields for the same reason). This is the only module that reads the environment.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from proxy.core.forwarding import IPNetwork
from proxy.core.hosts import BadHost, normalize_host
from proxy.cparser import c_parser_in_use

AuthMode = Literal["api_key", "optional", "none"]
_T = TypeVar("_T")

DEFAULT_CONFIG = "config/edge.toml"


class ConfigError(Exception):
    """Configuration problems: each of ``problems`` is one line that names the key (most
    often there is one); ``str()`` is those lines."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems: tuple[str, ...] = problems


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen: HostPort = HostPort("0.0.0.0", 8080)
    admin_listen: HostPort = HostPort("127.0.0.1", 9901)
    trusted_proxies: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.1/32"),)
    max_body_bytes: int = 104_857_600
    # A client must finish each request head within this, counted from its first byte (from
    # the accept for a new connection); aiohttp itself has no such deadline (slowloris).
    header_timeout_s: float = 10.0
    # Longest pause between two reads of a request body (nginx's client_body_timeout, also
    # 60 s); then 408 and the connection is closed. Without it a client that stops mid-upload
    # holds its connection and an upstream connection for ever.
    body_timeout_s: float = 60.0
    # aiohttp's defaults (8190 bytes per line and per field); beyond them the answer is 431.
    max_line_size: int = 8190
    max_field_size: int = 8190
    # Header field lines per request; more is 431 (Envoy's max_headers_count default is 100).
    max_headers: int = 100
    keepalive_timeout_s: float = 75.0
    shutdown_timeout_s: float = 30.0
    # Open client connections per process; the next one is closed as soon as it is accepted.
    max_connections: int = 10_000
    # Start even though aiohttp fell back to its pure-Python HTTP parser (proxy.cparser).
    allow_python_parser: bool = False
    # Accept the PROXY protocol (v1 and v2) from trusted_proxies on the public listener; a
    # connection from anyone else that begins with a PROXY header is closed (CONTRACT §7).
    proxy_protocol: bool = False


@dataclass(frozen=True, slots=True)
class TenancySettings:
    platform_domains: tuple[str, ...] = ("flatrender.test",)
    cache_ttl_s: float = 30.0
    # While Postgres is unreachable, cached tenants and keys keep serving this long past their TTL.
    stale_if_error_s: float = 300.0
    # No request waits longer than this on the database.
    store_timeout_s: float = 1.0
    # Database lookups per second (burst as many) for Hosts and key prefixes that turn out not
    # to exist; beyond it an uncached lookup is 503 (CONTRACT §3).
    max_miss_lookups_per_s: int = 200
    # Database mode: every host and key prefix is loaded at start-up (and kept by NOTIFY) when
    # tenants + key prefixes are at most this many; above it (or 0), names are looked up on use.
    preload_max_entries: int = 2_000_000
    # Embedded mode only (no DATABASE_URL): tenants and API keys come from this file.
    embedded_file: Path = Path("config/tenants.toml")


@dataclass(frozen=True, slots=True)
class RatelimitSettings:
    failure_mode: Literal["open", "closed"] = "open"
    shadow: bool = False
    # Deadline of one Redis call, event-loop lag included. Measured with
    # loadtests/limiter_deadline.py: on a healthy Redis the slowest call was 18 ms in a burst of
    # 100 concurrent requests, 120 ms at 1,000 and 194 ms at 2,000 (one core, loop-lag bound).
    # A deadline below that fires on a healthy Redis, which fail-open means over-admission;
    # 500 ms keeps a 2.5x margin, and a black-holed Redis costs it once (then the breaker).
    timeout_ms: int = 500
    # Fail-open buckets hold rpm / expected_instances, so N proxies together stay near the limit.
    expected_instances: int = 1
    # Per-IP bucket (per tenant) for requests without a key on "none"/"optional" routes; 0: off.
    anonymous_rpm: int = 0
    # How long a render-quota reservation outlives a process that died holding it. Longer than
    # any request's upload plus the upstream's answer, or a unit could be reserved twice.
    quota_lease_s: int = 900


@dataclass(frozen=True, slots=True)
class AuditSettings:
    flush_interval_ms: int = 500
    spool_dir: Path = Path("var/spool")
    # Embedded mode only: audit rows go to this JSON-lines file.
    jsonl_path: Path = Path("var/audit.jsonl")
    # Database mode (CONTRACT §9, issue 6). A batch is written as soon as it is full, or
    # every flush_interval_ms; it is also the size of one spool file.
    batch_max_rows: int = 1000
    # Rows held in memory while Postgres is unreachable; past this, batches spill to spool_dir.
    buffer_max_rows: int = 10_000
    # Past this many bytes in spool_dir, rows are dropped (counted, and logged as errors).
    spool_max_bytes: int = 1 << 30
    # One batch (connect, partition check, COPY, insert, commit) must finish within this.
    write_timeout_s: float = 5.0
    # SIGTERM: time to write what is queued before spooling the rest instead.
    drain_timeout_s: float = 5.0
    # Key usage (usage_count, last_used_*) is written at most once per key this often: one
    # row update per active key per interval, whatever the request rate (CONTRACT §5).
    usage_flush_interval_s: float = 10.0


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    # One JSON line per request on stderr (through the non-blocking log queue).
    access_log: bool = True
    # The standard OpenTelemetry variables: exporter "none" (the default: no tracing at all,
    # no cost), "console" or "otlp" (needs opentelemetry-exporter-otlp installed).
    traces_exporter: str = "none"
    sampler: str = "parentbased_always_on"
    sampler_arg: float = 1.0
    service_name: str = "flatrender-edge"
    # OTEL_SDK_DISABLED=true: no tracing at all, and the client's traceparent goes upstream
    # unchanged (CONTRACT §10), as with the sampler always_off.
    sdk_disabled: bool = False


@dataclass(frozen=True, slots=True)
class DomainsSettings:
    """Custom-domain verification (CONTRACT §12), database mode only."""

    # Each `serve` runs the verifier (one process of the deployment checks at a time).
    verify: bool = True
    # The port an HTTP_FILE check connects to on the domain (where the edge answers it).
    http_port: int = 80
    # DNS servers ("IP:PORT") the checks resolve through; empty: the system resolver.
    nameservers: tuple[HostPort, ...] = ()
    # How long a challenge made by `domains add` stays valid (7 days).
    challenge_ttl_s: float = 604_800.0
    # Non-public networks HTTP_FILE checks may connect to anyway (CIDRs); by default none.
    allow_networks: tuple[IPNetwork, ...] = ()


# The lease of a claimed webhook attempt is timeout_s plus at least this (CONTRACT §11).
LEASE_MARGIN_S = 5.0


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """Delivery of events to the tenants' webhooks (CONTRACT §11); database mode only."""

    # Every `serve` in database mode runs a dispatcher; false leaves it to `webhooks run`.
    enabled: bool = True
    timeout_s: float = 15.0
    # A claimed attempt is made again by any dispatcher after this (its maker died); at least
    # timeout_s + 5 s (CONTRACT §11), or an attempt still in flight, or still being recorded,
    # could be claimed a second time.
    lease_s: float = 20.0
    retry_schedule_s: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
    disable_after_failures: int = 20
    max_in_flight_per_webhook: int = 4
    max_in_flight: int = 256
    allow_http: bool = False
    allow_networks: tuple[IPNetwork, ...] = ()
    retention_days: int = 30


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    name: str
    urls: tuple[str, ...]
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 60.0
    max_connections: int = 256


@dataclass(frozen=True, slots=True)
class RouteSettings:
    prefix: str
    upstream: str
    auth: AuthMode = "api_key"
    scopes: Mapping[str, str] = field(default_factory=dict)
    audit: bool = False
    embed: bool = False
    # Requests made with an fr_test_ key go here instead, when set (a staging render farm).
    test_upstream: str | None = None
    # "renders": a 2xx POST here starts a render, counted against the monthly quota (§13).
    meter: Literal["renders"] | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings
    tenancy: TenancySettings
    ratelimit: RatelimitSettings
    audit: AuditSettings
    upstreams: Mapping[str, UpstreamSettings]
    routes: tuple[RouteSettings, ...]
    config_path: Path
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    domains: DomainsSettings = field(default_factory=DomainsSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    database_url: str | None = None
    redis_url: str | None = None
    redis_mode: Literal["standalone", "cluster", "sentinel"] = "standalone"
    redis_sentinel_service: str | None = None


# --------------------------------------------------------------------------- field readers


class _Table:
    """One TOML table being read: typed getters that name the full key in problems.

    A getter never raises: a bad value is recorded in ``problems`` (shared with the tables read
    from this one) and the default stands in, so that reading goes on and finds the rest.
    """

    def __init__(self, data: Any, where: str, problems: list[str] | None = None) -> None:
        self.problems: list[str] = [] if problems is None else problems
        self._where = where
        self._seen: set[str] = set()
        self._bad: set[str] = set()  # keys with a problem recorded: one line per key
        self._broken = not isinstance(data, dict)  # reported once; nothing more from it
        self._data: dict[str, Any] = {} if self._broken else data
        if self._broken:
            self.problems.append(f"{where}: expected a table")

    def key(self, name: str) -> str:
        return f"{self._where}.{name}" if self._where else name

    def problem(self, name: str, message: str) -> None:
        """Record ``<key>: message``, unless this key or table already has a problem."""
        self._seen.add(name)
        if self._broken or name in self._bad:
            return
        self._bad.add(name)
        self.problems.append(f"{self.key(name)}: {message}")

    def checked(self, name: str, fallback: _T, convert: Callable[[], _T]) -> _T:
        """``convert()``, or ``fallback`` with the ``ConfigError`` it raised recorded."""
        try:
            return convert()
        except ConfigError as e:
            self._seen.add(name)
            if not (self._broken or name in self._bad):
                self._bad.add(name)
                self.problems.extend(e.problems)
            return fallback

    def section(self, name: str, read: Callable[[_Table], _T], fallback: _T) -> _T:
        """``read`` the table ``name``; a ``ConfigError`` it raises is recorded, not fatal."""
        table = self.table(name)
        try:
            return read(table)
        except ConfigError as e:
            table.problems.extend(e.problems)
            return fallback

    def _get(self, name: str, default: _T, check: Callable[[Any], bool], what: str) -> Any:
        self._seen.add(name)
        if name not in self._data:
            return default
        value = self._data[name]
        if not check(value):
            self.problem(name, f"expected {what}, got {value!r}")
            return default
        return value

    def value(self, name: str, default: _T, check: Callable[[Any], bool], what: str) -> Any:
        """The value of ``name`` when ``check`` accepts it, else ``default`` (and a problem
        unless it is absent): the typed getters' shape, for a type they do not cover."""
        return self._get(name, default, check, what)

    def text(self, name: str, default: str) -> str:
        value: str = self._get(name, default, lambda v: isinstance(v, str) and v != "", "a string")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value: bool = self._get(name, default, lambda v: isinstance(v, bool), "true or false")
        return value

    def positive(self, name: str, default: float) -> float:
        value = self._get(
            name,
            default,
            lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v > 0,
            "a positive number",
        )
        return float(value)

    def positive_int(self, name: str, default: int) -> int:
        value: int = self._get(
            name,
            default,
            lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
            "a positive integer",
        )
        return value

    def str_list(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(
            name,
            default,
            lambda v: isinstance(v, list) and all(isinstance(i, str) and i for i in v),
            "a list of strings",
        )
        return tuple(value)

    def table(self, name: str) -> _Table:
        self._seen.add(name)
        return _Table(self._data.get(name, {}), self.key(name), self.problems)

    def names(self) -> list[str]:
        return list(self._data)

    def mark_seen(self, name: str) -> None:
        self._seen.add(name)

    def finish(self) -> None:
        """Record every key of the table that nothing read."""
        for name in sorted(set(self._data) - self._seen):
            self.problem(name, "unknown key")


# The same reader for the embedded tenants file (stores.memory): every problem, unknown keys too.
Table = _Table


def parse_host_port(value: str, key: str) -> HostPort:
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")
    return HostPort(host, int(port))


def _parse_cidr(value: str, key: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(f"{key}: not a CIDR: {value!r}") from None


def _host_name(value: str, key: str) -> str:
    try:
        return normalize_host(value)
    except BadHost:
        raise ConfigError(f"{key}: not a host name: {value!r}") from None


def _check_http_url(value: str, key: str) -> str:
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise ConfigError(f"{key}: not an http(s) URL: {value!r}")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        # The upstream receives the path as routed (CONTRACT §7): a base path would rewrite it.
        raise ConfigError(f"{key}: an upstream URL is scheme://host:port only, got {value!r}")
    return f"{parts.scheme}://{parts.netloc}"


def _check_redis_url(value: str, key: str) -> str:
    """``redis[s]://[[user]:password@]host[:port][/db]`` (CONTRACT §2) and nothing more: an
    option the limiter's client would not understand must stop the start, not be ignored."""
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(f"{key}: not a redis:// or rediss:// URL")
    if parts.query or parts.fragment:
        raise ConfigError(f"{key}: URL options (?...) are not supported")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ConfigError(f"{key}: the path names a database number, got {db!r}")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        raise ConfigError(f"{key}: the port is not a number") from None
    return value


def _check_database_url(value: str, key: str) -> str:
    if urlsplit(value).scheme not in ("postgres", "postgresql"):
        raise ConfigError(f"{key}: not a postgresql:// URL")
    return value


# --------------------------------------------------------------------------- sections


def _server(t: _Table) -> ServerSettings:
    d = ServerSettings()
    cidrs = t.str_list("trusted_proxies", tuple(str(n) for n in d.trusted_proxies))
    trusted = t.checked(
        "trusted_proxies",
        d.trusted_proxies,
        lambda: tuple(_parse_cidr(c, t.key("trusted_proxies")) for c in cidrs),
    )
    listen, admin = t.text("listen", str(d.listen)), t.text("admin_listen", str(d.admin_listen))
    s = ServerSettings(
        listen=t.checked("listen", d.listen, lambda: parse_host_port(listen, t.key("listen"))),
        admin_listen=t.checked(
            "admin_listen", d.admin_listen, lambda: parse_host_port(admin, t.key("admin_listen"))
        ),
        trusted_proxies=trusted,
        max_body_bytes=t.positive_int("max_body_bytes", d.max_body_bytes),
        header_timeout_s=t.positive("header_timeout_s", d.header_timeout_s),
        body_timeout_s=t.positive("body_timeout_s", d.body_timeout_s),
        max_line_size=t.positive_int("max_line_size", d.max_line_size),
        max_field_size=t.positive_int("max_field_size", d.max_field_size),
        max_headers=t.positive_int("max_headers", d.max_headers),
        keepalive_timeout_s=t.positive("keepalive_timeout_s", d.keepalive_timeout_s),
        shutdown_timeout_s=t.positive("shutdown_timeout_s", d.shutdown_timeout_s),
        max_connections=t.positive_int("max_connections", d.max_connections),
        allow_python_parser=t.flag("allow_python_parser", d.allow_python_parser),
        proxy_protocol=t.flag("proxy_protocol", d.proxy_protocol),
    )
    t.finish()
    if not s.allow_python_parser and not c_parser_in_use():
        # Checked here, before --workers forks, so the refusal is one line and exit 2.
        t.problem(
            "allow_python_parser",
            "aiohttp's C HTTP parser is not in use "
            "(extension missing or AIOHTTP_NO_EXTENSIONS set); refusing to start",
        )
    return s


def _tenancy(t: _Table, base: Path) -> TenancySettings:
    d = TenancySettings()
    # The same normal form as a Host (CONTRACT §3), or "Bücher.test" would never match the
    # "xn--bcher-kva.test" that normalize_host makes of every request's Host.
    names = t.str_list("platform_domains", d.platform_domains)
    domains = t.checked(
        "platform_domains",
        d.platform_domains,
        lambda: tuple(_host_name(dom, t.key("platform_domains")) for dom in names),
    )
    s = TenancySettings(
        platform_domains=domains,
        cache_ttl_s=t.positive("cache_ttl_s", d.cache_ttl_s),
        stale_if_error_s=t.positive("stale_if_error_s", d.stale_if_error_s),
        store_timeout_s=t.positive("store_timeout_s", d.store_timeout_s),
        max_miss_lookups_per_s=t.positive_int("max_miss_lookups_per_s", d.max_miss_lookups_per_s),
        preload_max_entries=t._get(
            "preload_max_entries",
            d.preload_max_entries,
            lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            "a non-negative integer",
        ),
        embedded_file=base / t.text("embedded_file", str(d.embedded_file)),
    )
    t.finish()
    return s


def _ratelimit(t: _Table) -> RatelimitSettings:
    mode = t.text("failure_mode", "open")
    if mode not in ("open", "closed"):
        t.problem("failure_mode", f'expected "open" or "closed", got {mode!r}')
        mode = "open"
    d = RatelimitSettings()
    anonymous = t._get(
        "anonymous_rpm",
        d.anonymous_rpm,
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "a non-negative integer",
    )
    s = RatelimitSettings(
        failure_mode=mode,  # type: ignore[arg-type]
        shadow=t.flag("shadow", False),
        timeout_ms=t.positive_int("timeout_ms", d.timeout_ms),
        expected_instances=t.positive_int("expected_instances", d.expected_instances),
        anonymous_rpm=anonymous,
        quota_lease_s=t.positive_int("quota_lease_s", d.quota_lease_s),
    )
    t.finish()
    return s


def _audit(t: _Table, base: Path) -> AuditSettings:
    d = AuditSettings()
    s = AuditSettings(
        flush_interval_ms=t.positive_int("flush_interval_ms", d.flush_interval_ms),
        spool_dir=base / t.text("spool_dir", str(d.spool_dir)),
        jsonl_path=base / t.text("jsonl_path", str(d.jsonl_path)),
        batch_max_rows=t.positive_int("batch_max_rows", d.batch_max_rows),
        buffer_max_rows=t.positive_int("buffer_max_rows", d.buffer_max_rows),
        spool_max_bytes=t.positive_int("spool_max_bytes", d.spool_max_bytes),
        write_timeout_s=t.positive("write_timeout_s", d.write_timeout_s),
        drain_timeout_s=t.positive("drain_timeout_s", d.drain_timeout_s),
        usage_flush_interval_s=t.positive("usage_flush_interval_s", d.usage_flush_interval_s),
    )
    if s.buffer_max_rows < s.batch_max_rows:
        # The buffer must hold at least one full batch, or every batch would spill unwritten.
        t.problem(
            "buffer_max_rows",
            f"must be at least batch_max_rows ({s.batch_max_rows}), got {s.buffer_max_rows}",
        )
    t.finish()
    return s


_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


def _telemetry(t: _Table, env: Mapping[str, str]) -> TelemetrySettings:
    d = TelemetrySettings()
    exporter = env.get("OTEL_TRACES_EXPORTER", d.traces_exporter).strip().lower() or "none"
    if exporter not in ("none", "console", "otlp"):
        t.problems.append(f"OTEL_TRACES_EXPORTER: expected none, console or otlp, got {exporter!r}")
    sampler = env.get("OTEL_TRACES_SAMPLER", d.sampler).strip().lower() or d.sampler
    if sampler not in _SAMPLERS:
        t.problems.append(f"OTEL_TRACES_SAMPLER: expected one of {', '.join(_SAMPLERS)}")
    try:
        arg = float(env.get("OTEL_TRACES_SAMPLER_ARG", d.sampler_arg))
    except ValueError:
        arg = -1.0
    if not 0.0 <= arg <= 1.0:
        t.problems.append("OTEL_TRACES_SAMPLER_ARG: expected a ratio between 0 and 1")
    disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower()
    if disabled not in ("", "true", "false"):
        t.problems.append(f"OTEL_SDK_DISABLED: expected true or false, got {disabled!r}")
    s = TelemetrySettings(
        sdk_disabled=disabled == "true",
        access_log=t.flag("access_log", d.access_log),
        traces_exporter=exporter,
        sampler=sampler,
        sampler_arg=arg,
        service_name=env.get("OTEL_SERVICE_NAME", d.service_name) or d.service_name,
    )
    t.finish()
    return s


def _nameserver(value: str, key: str) -> HostPort:
    """``IP:PORT`` (``[IPv6]:PORT``): a resolver is asked by address, never by name."""
    hp = parse_host_port(value, key)
    try:
        ipaddress.ip_address(hp.host)
    except ValueError:
        raise ConfigError(f"{key}: expected IP:PORT, got {value!r}") from None
    return hp


def _domains(t: _Table) -> DomainsSettings:
    d = DomainsSettings()
    port = t.positive_int("http_port", d.http_port)
    if port > 65535:
        t.problem("http_port", f"expected a port number, got {port}")
        port = d.http_port
    names = t.str_list("nameservers", ())
    nameservers = t.checked(
        "nameservers",
        d.nameservers,
        lambda: tuple(_nameserver(v, t.key("nameservers")) for v in names),
    )
    networks = t.str_list("allow_networks", ())
    s = DomainsSettings(
        verify=t.flag("verify", d.verify),
        http_port=port,
        nameservers=nameservers,
        challenge_ttl_s=t.positive("challenge_ttl_s", d.challenge_ttl_s),
        allow_networks=t.checked(
            "allow_networks",
            d.allow_networks,
            lambda: tuple(_parse_cidr(c, t.key("allow_networks")) for c in networks),
        ),
    )
    t.finish()
    return s


def _webhooks(t: _Table) -> WebhookSettings:
    d = WebhookSettings()
    timeout = t.positive("timeout_s", d.timeout_s)
    schedule = t._get(
        "retry_schedule_s",
        d.retry_schedule_s,
        lambda v: (
            isinstance(v, list | tuple)
            and all(isinstance(i, int | float) and not isinstance(i, bool) and i > 0 for i in v)
        ),
        "a list of positive numbers",
    )
    networks = t.str_list("allow_networks", ())
    s = WebhookSettings(
        enabled=t.flag("enabled", d.enabled),
        timeout_s=timeout,
        lease_s=t.positive("lease_s", timeout + LEASE_MARGIN_S),
        retry_schedule_s=tuple(float(i) for i in schedule),
        disable_after_failures=t.positive_int("disable_after_failures", d.disable_after_failures),
        max_in_flight_per_webhook=t.positive_int(
            "max_in_flight_per_webhook", d.max_in_flight_per_webhook
        ),
        max_in_flight=t.positive_int("max_in_flight", d.max_in_flight),
        allow_http=t.flag("allow_http", d.allow_http),
        allow_networks=t.checked(
            "allow_networks",
            d.allow_networks,
            lambda: tuple(_parse_cidr(c, t.key("allow_networks")) for c in networks),
        ),
        retention_days=t.positive_int("retention_days", d.retention_days),
    )
    if s.lease_s < s.timeout_s + LEASE_MARGIN_S:
        t.problem(
            "lease_s",
            f"must be at least timeout_s + {LEASE_MARGIN_S:g} ({s.timeout_s + LEASE_MARGIN_S:g}),"
            f" got {s.lease_s:g}",
        )
    t.finish()
    return s


def _upstream(name: str, t: _Table) -> UpstreamSettings:
    urls = t.str_list("urls", ())
    if not urls:
        t.problem("urls", "at least one URL is required")
    d = UpstreamSettings(name, ())
    s = UpstreamSettings(
        name=name,
        urls=t.checked("urls", (), lambda: tuple(_check_http_url(u, t.key("urls")) for u in urls)),
        connect_timeout_s=t.positive("connect_timeout_s", d.connect_timeout_s),
        read_timeout_s=t.positive("read_timeout_s", d.read_timeout_s),
        max_connections=t.positive_int("max_connections", d.max_connections),
    )
    t.finish()
    return s


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _route(t: _Table, upstreams: Mapping[str, UpstreamSettings]) -> RouteSettings:
    prefix = t.text("prefix", "")
    if not prefix.startswith("/"):
        t.problem("prefix", f"must start with '/', got {prefix!r}")
    upstream = t.text("upstream", "")
    if upstream not in upstreams:
        t.problem("upstream", f"unknown upstream {upstream!r}")
    test_upstream = t.text("test_upstream", "") or None
    if test_upstream is not None and test_upstream not in upstreams:
        t.problem("test_upstream", f"unknown upstream {test_upstream!r}")
    auth = t.text("auth", "api_key")
    if auth not in ("api_key", "optional", "none"):
        t.problem("auth", f"expected api_key, optional or none, got {auth!r}")
    scopes_table = t.table("scopes")
    scopes: dict[str, str] = {}
    for method in scopes_table.names():
        if method not in _METHODS:
            scopes_table.problem(method, "not an HTTP method")
            continue
        scopes[method] = scopes_table.text(method, "")
    scopes_table.finish()
    meter = t.text("meter", "") or None
    if meter not in (None, "renders"):
        t.problem("meter", f'expected "renders", got {meter!r}')
    audit = t.flag("audit", False)
    if meter is not None and not audit:
        # renders_started is written with the audit batch, from the route's rows (§9, §13).
        t.problem("meter", "needs audit = true on the route")
    s = RouteSettings(
        prefix=prefix,
        upstream=upstream,
        auth=auth,  # type: ignore[arg-type]
        scopes=scopes,
        audit=audit,
        embed=t.flag("embed", False),
        test_upstream=test_upstream,
        meter=meter,  # type: ignore[arg-type]
    )
    t.finish()
    return s


def _quota_lease_problem(
    ratelimit: RatelimitSettings,
    upstreams: Mapping[str, UpstreamSettings],
    routes: tuple[RouteSettings, ...],
) -> str | None:
    """A render-quota reservation is held until the upstream answers: a lease that can end
    first frees a unit still in use, and the quota admits one more than it should."""
    waits = [
        upstreams[r.upstream].read_timeout_s
        for r in routes
        if r.meter == "renders" and r.upstream in upstreams
    ]
    if waits and ratelimit.quota_lease_s <= max(waits):
        return (
            f"ratelimit.quota_lease_s: {ratelimit.quota_lease_s} must be above the longest"
            f" read_timeout_s of a metered route's upstream ({max(waits):g})"
        )
    return None


def parse_settings(data: Mapping[str, Any], env: Mapping[str, str], config_path: Path) -> Settings:
    """Build ``Settings`` from parsed TOML ``data`` and ``env`` (which wins over the file).

    Raises one ``ConfigError`` with every problem found (see the module docstring)."""
    root = _Table(dict(data), "")
    # Relative paths in the file are relative to the working directory the proxy runs in,
    # like nginx's prefix: the file is usually config/edge.toml in the project checkout.
    base = Path()
    server = root.section("server", _server, ServerSettings())
    tenancy = root.section("tenancy", lambda t: _tenancy(t, base), TenancySettings())
    ratelimit = root.section("ratelimit", _ratelimit, RatelimitSettings())
    audit = root.section("audit", lambda t: _audit(t, base), AuditSettings())

    telemetry = root.section("telemetry", lambda t: _telemetry(t, env), TelemetrySettings())
    domains = root.section("domains", _domains, DomainsSettings())
    webhooks = root.section("webhooks", _webhooks, WebhookSettings())
    up_root = root.table("upstreams")
    # An upstream with a problem keeps its name, so that its routes do not report it unknown.
    upstreams = {
        name: up_root.section(name, partial(_upstream, name), UpstreamSettings(name, ()))
        for name in up_root.names()
    }
    up_root.finish()

    root.mark_seen("routes")
    raw_routes = data.get("routes", [])
    if not isinstance(raw_routes, list):
        root.problem("routes", "expected an array of tables ([[routes]])")
        raw_routes = []
    routes = tuple(
        _route(_Table(r, f"routes[{i}]", root.problems), upstreams)
        for i, r in enumerate(raw_routes)
    )
    seen: set[str] = set()
    for i, r in enumerate(routes):
        if r.prefix in seen:
            root.problems.append(f"routes[{i}].prefix: duplicate prefix {r.prefix!r}")
        seen.add(r.prefix)
    lease_problem = _quota_lease_problem(ratelimit, upstreams, routes)
    if lease_problem:
        root.problems.append(lease_problem)
    root.finish()

    redis_mode = env.get("REDIS_MODE", "standalone")
    if redis_mode not in ("standalone", "cluster", "sentinel"):
        root.problem("REDIS_MODE", f"expected standalone, cluster or sentinel, got {redis_mode!r}")
    sentinel_service = env.get("REDIS_SENTINEL_SERVICE") or None
    if redis_mode == "sentinel" and not sentinel_service:
        root.problem("REDIS_SENTINEL_SERVICE", "required when REDIS_MODE=sentinel")
    database_url = env.get("DATABASE_URL") or None
    if database_url is not None:
        root.checked("DATABASE_URL", "", lambda: _check_database_url(database_url, "DATABASE_URL"))
    redis_url = env.get("REDIS_URL") or None
    if redis_url is not None:
        root.checked("REDIS_URL", "", lambda: _check_redis_url(redis_url, "REDIS_URL"))
    if root.problems:
        raise ConfigError(*root.problems)
    return Settings(
        server=server,
        tenancy=tenancy,
        ratelimit=ratelimit,
        audit=audit,
        upstreams=upstreams,
        routes=routes,
        config_path=config_path,
        telemetry=telemetry,
        domains=domains,
        webhooks=webhooks,
        database_url=database_url,
        redis_url=redis_url,
        redis_mode=redis_mode,  # type: ignore[arg-type]
        redis_sentinel_service=sentinel_service,
    )


def load_settings(env: Mapping[str, str], config: str | None = None) -> Settings:
    """Read the TOML file (``--config``, else ``EDGE_CONFIG``, else the default) and ``env``."""
    path = Path(config or env.get("EDGE_CONFIG") or DEFAULT_CONFIG)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    try:
        return parse_settings(data, env, path)
    except ConfigError as e:
        raise ConfigError(*(f"{path}: {p}" for p in e.problems)) from None
