"""The embedded default: tenants and API keys from a TOML file, held in memory.

Used when ``DATABASE_URL`` is unset and by unit tests of stages. Keys are stored as in the
database (prefix, SHA-256 hex, last four), never in clear. The file is read with the main
configuration's reader (``settings.Table``): every problem at once, one line each naming the
key, and an unknown key is a problem (a misspelt ``monthly_render_qty`` would mean no quota).
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from proxy.core.apikeys import PREFIX_LEN, ApiKey
from proxy.core.tenancy import Branding, Tenant
from proxy.settings import ConfigError, Table
from proxy.stores.base import TenantKind

_STATUSES = ("Active", "Trial", "Suspended", "Cancelled")


class MemoryTenantStore:
    """Tenants and their HTTP_FILE domain-verification challenges (``[[domain_verifications]]``)."""

    def __init__(
        self,
        tenants: Iterable[Tenant],
        challenges: Iterable[tuple[str, str, datetime]] = (),
    ) -> None:
        self._challenges: dict[str, list[tuple[str, datetime]]] = {}
        for domain, token, expires_at in challenges:
            self._challenges.setdefault(domain.lower(), []).append((token, expires_at))
        self._by_id = {t.id: t for t in tenants}
        self._by_slug = {t.slug.lower(): t for t in self._by_id.values()}
        self._by_domain = {
            t.custom_domain.lower(): t for t in self._by_id.values() if t.custom_domain
        }

    def cached_tenant(self, kind: TenantKind, value: str) -> Tenant | None:
        if kind == "domain":
            return self._by_domain.get(value)
        if kind == "slug":
            return self._by_slug.get(value.lower())
        return self._by_id.get(value)

    async def by_custom_domain(self, host: str) -> Tenant | None:
        return self._by_domain.get(host)

    async def by_slug(self, slug: str) -> Tenant | None:
        return self._by_slug.get(slug.lower())

    async def by_id(self, tenant_id: str) -> Tenant | None:
        return self._by_id.get(tenant_id)

    async def challenge_valid(self, domain: str, token: str, now: datetime) -> bool:
        return any(t == token and now < exp for t, exp in self._challenges.get(domain, ()))


class MemoryKeyStore:
    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._by_prefix: dict[str, list[ApiKey]] = {}
        self._by_id: dict[str, ApiKey] = {}
        for key in keys:
            self._by_prefix.setdefault(key.key_prefix, []).append(key)
            self._by_id[key.id.lower()] = key

    def cached_keys(self, prefix: str) -> Sequence[ApiKey]:
        return self._by_prefix.get(prefix, ())

    async def by_prefix(self, prefix: str) -> Sequence[ApiKey]:
        return self._by_prefix.get(prefix, ())

    async def key_by_id(self, key_id: str) -> ApiKey | None:
        return self._by_id.get(key_id.lower())


def _required(t: Table, name: str) -> str:
    value = t.text(name, "")
    if not value:
        t.problem(name, "required string")  # no second line when text() found a wrong type
    return value


def _strings(t: Table, name: str) -> tuple[str, ...] | None:
    """A list of strings, or None when absent: ``scopes = [1]`` would otherwise load and then
    fail on every request, and ``allowed_ips = [5]`` would silently mean 0.0.0.5/32."""
    value = t.value(name, None, _is_str_list, "a list of strings")
    return None if value is None else tuple(value)


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _time(t: Table, name: str) -> datetime | None:
    value = t.value(name, None, lambda v: isinstance(v, datetime | str), "an ISO 8601 time")
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            t.problem(name, "not an ISO 8601 time")
            return None
    if value is not None and value.tzinfo is None:
        t.problem(name, "needs a UTC offset")
        return None
    result: datetime | None = value
    return result


def _tables(root: Table, data: dict[str, Any], name: str) -> list[Table]:
    """``[[name]]`` entries; ``[name]`` (one table) or ``name = [1]`` is a problem."""
    root.mark_seen(name)
    value = data.get(name, [])
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        root.problem(name, f"expected an array of tables ([[{name}]])")
        return []
    return [Table(row, f"{name}[{i}]", root.problems) for i, row in enumerate(value)]


def _tenant(t: Table) -> Tenant:
    tenant_id, slug = _required(t, "id"), _required(t, "slug")
    status = t.value("status", "Active", lambda v: v in _STATUSES, f"one of {', '.join(_STATUSES)}")
    quota = t.value(
        "monthly_render_qty",
        None,
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "a non-negative integer",
    )
    branding = None
    if "branding" in t.names():
        b = t.table("branding")
        branding = Branding(
            embed_enabled=b.flag("embed_enabled", False),
            embed_allowed_hosts=_strings(b, "embed_allowed_hosts") or (),
        )
        b.finish()
    tenant = Tenant(
        id=tenant_id,
        slug=slug.lower(),
        status=status,
        custom_domain=t.value("custom_domain", "", lambda v: isinstance(v, str), "a string").lower()
        or None,
        domain_verified=t.flag("domain_verified", False),
        allowed_origins=_strings(t, "allowed_origins") or (),
        trial_ends_at=_time(t, "trial_ends_at"),
        branding=branding,
        # Free-form by design (the platform's tenants.features column): no keys to check.
        features=t.value("features", {}, lambda v: isinstance(v, dict), "a table"),
        monthly_render_qty=quota,
    )
    t.finish()
    return tenant


def _key(t: Table, tenant_ids: dict[str, str]) -> ApiKey:
    key_id, slug = _required(t, "id"), _required(t, "tenant")
    prefix, digest = _required(t, "key_prefix"), _required(t, "key_hash").lower()
    t.value("name", "", lambda v: isinstance(v, str), "a string")  # for people; unused
    if slug and slug not in tenant_ids:
        t.problem("tenant", f"unknown tenant slug {slug!r}")
    if prefix and (len(prefix) != PREFIX_LEN or not prefix.startswith(("fr_live_", "fr_test_"))):
        t.problem("key_prefix", f"expected the key's first {PREFIX_LEN} characters")
    if digest and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
        t.problem("key_hash", "expected a SHA-256 hex digest")
    ips = _strings(t, "allowed_ips")
    allowed = None
    try:
        allowed = None if ips is None else tuple(ipaddress.ip_network(i, strict=False) for i in ips)
    except ValueError:
        t.problem("allowed_ips", "not a list of CIDRs")
    key = ApiKey(
        id=key_id,
        tenant_id=tenant_ids.get(slug, ""),
        environment="test" if prefix.startswith("fr_test_") else "live",
        key_prefix=prefix,
        key_hash=digest,
        scopes=_strings(t, "scopes") or (),
        allowed_ips=allowed,
        rate_limit_rpm=t.positive_int("rate_limit_rpm", 600),
        is_active=t.flag("is_active", True),
        expires_at=_time(t, "expires_at"),
        revoked_at=_time(t, "revoked_at"),
    )
    t.finish()
    return key


def load_embedded(path: Path) -> tuple[MemoryTenantStore, MemoryKeyStore]:
    """Read the embedded tenants file; a ``ConfigError`` with one line per problem, every
    problem of the file at once (unknown keys too), as the main configuration's."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"tenancy.embedded_file: {path} not found") from None
    except OSError as e:
        raise ConfigError(f"tenancy.embedded_file: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    root = Table(data, "")
    tenants = [_tenant(t) for t in _tables(root, data, "tenants")]
    by_slug = {t.slug: t.id for t in tenants}
    keys = [_key(t, by_slug) for t in _tables(root, data, "keys")]
    challenges = [_challenge(t) for t in _tables(root, data, "domain_verifications")]
    root.finish()
    if root.problems:
        raise ConfigError(*(f"{path}: {p}" for p in root.problems))
    return MemoryTenantStore(tenants, challenges), MemoryKeyStore(keys)


def _challenge(t: Table) -> tuple[str, str, datetime]:
    domain, token = _required(t, "domain"), _required(t, "token")
    expires_at = _time(t, "expires_at")
    if expires_at is None:
        t.problem("expires_at", "required")
    t.finish()
    return domain.lower(), token, expires_at or datetime.min
