"""The embedded default: tenants and API keys from a TOML file, held in memory.

Used when ``DATABASE_URL`` is unset and by unit tests of stages. Keys are stored as in the
database (prefix, SHA-256 hex, last four), never in clear. The file is validated as strictly as
the main configuration: a bad entry is a ``ConfigError`` naming it.
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
from proxy.settings import ConfigError
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


def _get(row: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = row.get(name)
    if value is not None and not isinstance(value, kind):
        raise ConfigError(f"{where}.{name}: wrong type {type(value).__name__}")
    return value


def _strings(row: dict[str, Any], name: str, where: str) -> tuple[str, ...] | None:
    """A list of strings, or None when absent: ``scopes = [1]`` would otherwise load and then
    fail on every request, and ``allowed_ips = [5]`` would silently mean 0.0.0.5/32."""
    value = _get(row, name, list, where)
    if value is not None and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}.{name}: expected a list of strings")
    return None if value is None else tuple(value)


def _tables(data: dict[str, Any], name: str, where: str) -> list[dict[str, Any]]:
    """``[[name]]`` entries; ``[name]`` (one table) or ``name = [1]`` is a ConfigError."""
    value = data.get(name, [])
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise ConfigError(f"{where}{name}: expected an array of tables ([[{name}]])")
    return value


def _time(row: dict[str, Any], name: str, where: str) -> datetime | None:
    value = _get(row, name, (datetime, str), where)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ConfigError(f"{where}.{name}: not an ISO 8601 time") from None
    if value is not None and value.tzinfo is None:
        raise ConfigError(f"{where}.{name}: needs a UTC offset")
    result: datetime | None = value
    return result


def _tenant(row: dict[str, Any], where: str) -> Tenant:
    for name in ("id", "slug"):
        if not isinstance(row.get(name), str):
            raise ConfigError(f"{where}.{name}: required string")
    status = row.get("status", "Active")
    if status not in _STATUSES:
        raise ConfigError(f"{where}.status: expected one of {', '.join(_STATUSES)}")
    branding = _get(row, "branding", dict, where)
    quota = _get(row, "monthly_render_qty", int, where)
    if isinstance(quota, bool) or (quota is not None and quota < 0):
        raise ConfigError(f"{where}.monthly_render_qty: expected a non-negative integer")
    return Tenant(
        id=row["id"],
        slug=row["slug"].lower(),
        status=status,
        custom_domain=(_get(row, "custom_domain", str, where) or "").lower() or None,
        domain_verified=bool(_get(row, "domain_verified", bool, where)),
        allowed_origins=_strings(row, "allowed_origins", where) or (),
        trial_ends_at=_time(row, "trial_ends_at", where),
        branding=Branding(
            embed_enabled=bool(branding.get("embed_enabled", False)),
            embed_allowed_hosts=_strings(branding, "embed_allowed_hosts", f"{where}.branding")
            or (),
        )
        if branding is not None
        else None,
        features=_get(row, "features", dict, where) or {},
        monthly_render_qty=quota,
    )


def _key(row: dict[str, Any], where: str, tenant_ids: dict[str, str]) -> ApiKey:
    for name in ("id", "tenant", "key_prefix", "key_hash"):
        if not isinstance(row.get(name), str):
            raise ConfigError(f"{where}.{name}: required string")
    if row["tenant"] not in tenant_ids:
        raise ConfigError(f"{where}.tenant: unknown tenant slug {row['tenant']!r}")
    prefix, digest = row["key_prefix"], row["key_hash"].lower()
    if len(prefix) != PREFIX_LEN or not prefix.startswith(("fr_live_", "fr_test_")):
        raise ConfigError(f"{where}.key_prefix: expected the key's first {PREFIX_LEN} characters")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigError(f"{where}.key_hash: expected a SHA-256 hex digest")
    ips = _strings(row, "allowed_ips", where)
    try:
        allowed = None if ips is None else tuple(ipaddress.ip_network(i, strict=False) for i in ips)
    except ValueError:
        raise ConfigError(f"{where}.allowed_ips: not a list of CIDRs") from None
    rpm = row.get("rate_limit_rpm", 600)
    if not isinstance(rpm, int) or isinstance(rpm, bool) or rpm <= 0:
        # 0 used to become 600 (``or 600``) and a negative rate broke the bucket arithmetic.
        raise ConfigError(f"{where}.rate_limit_rpm: expected a positive integer")
    return ApiKey(
        id=row["id"],
        tenant_id=tenant_ids[row["tenant"]],
        environment="test" if prefix.startswith("fr_test_") else "live",
        key_prefix=prefix,
        key_hash=digest,
        scopes=_strings(row, "scopes", where) or (),
        allowed_ips=allowed,
        rate_limit_rpm=rpm,
        is_active=row.get("is_active", True) is True,
        expires_at=_time(row, "expires_at", where),
        revoked_at=_time(row, "revoked_at", where),
    )


def load_embedded(path: Path) -> tuple[MemoryTenantStore, MemoryKeyStore]:
    """Read the embedded tenants file; every problem is a one-line ``ConfigError``."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"tenancy.embedded_file: {path} not found") from None
    except OSError as e:
        raise ConfigError(f"tenancy.embedded_file: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    where = f"{path}: "
    rows = _tables(data, "tenants", where)
    tenants = [_tenant(r, f"{where}tenants[{i}]") for i, r in enumerate(rows)]
    by_slug = {t.slug: t.id for t in tenants}
    rows = _tables(data, "keys", where)
    keys = [_key(r, f"{where}keys[{i}]", by_slug) for i, r in enumerate(rows)]
    rows = _tables(data, "domain_verifications", where)
    challenges = [_challenge(r, f"{where}domain_verifications[{i}]") for i, r in enumerate(rows)]
    return MemoryTenantStore(tenants, challenges), MemoryKeyStore(keys)


def _challenge(row: dict[str, Any], where: str) -> tuple[str, str, datetime]:
    for name in ("domain", "token"):
        if not isinstance(row.get(name), str) or not row[name]:
            raise ConfigError(f"{where}.{name}: required string")
    expires_at = _time(row, "expires_at", where)
    if expires_at is None:
        raise ConfigError(f"{where}.expires_at: required")
    return row["domain"].lower(), row["token"], expires_at
