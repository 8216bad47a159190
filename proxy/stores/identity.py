"""The production identity store: Postgres behind loading caches, kept fresh by LISTEN/NOTIFY.

Implements ``TenantStore``, ``KeyStore`` and ``ChallengeStore``. A notification evicts exactly
the entries it names (see ``sql/003_edge_invalidation.sql``); an unreadable one, and every
(re)connection of the listener, flushes everything, since changes may have been missed.

Lookups by a name a client chose (a Host, a key prefix, a challenge's domain) go through the
miss budget (``stores.miss_budget``, CONTRACT §3). Lookups by tenant id come from key rows,
not from clients, and are not budgeted.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from proxy.core.apikeys import ApiKey
from proxy.core.tenancy import Tenant
from proxy.gcfreeze import GrowthFreezer
from proxy.stores.base import Missing, TenantKind
from proxy.stores.cached import LoadingCache
from proxy.stores.miss_budget import BudgetedLoads
from proxy.stores.postgres import ChangeListener, PostgresStore

TenantKey = tuple[str, str]  # ("domain" | "slug" | "id", value)
_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")
# Unknown names remembered per cache, apart from the known ones (stores.cached).
MAX_MISS_ENTRIES = 10_000


class CachedIdentityStore:
    def __init__(
        self,
        dsn: str,
        *,
        ttl_s: float,
        stale_if_error_s: float,
        timeout_s: float,
        max_miss_lookups_per_s: float,
        max_entries: int = 100_000,
    ) -> None:
        self.db = PostgresStore(dsn, timeout_s=timeout_s)
        self.budgeted = BudgetedLoads(max_miss_lookups_per_s, timeout_s, max_known=max_entries)
        self.freezer = GrowthFreezer()

        def cache(load: Callable[[_K], Awaitable[_V]]) -> LoadingCache[_K, _V]:
            return LoadingCache(
                load,
                ttl_s=ttl_s,
                stale_if_error_s=stale_if_error_s,
                maxsize=max_entries,
                miss_maxsize=MAX_MISS_ENTRIES,
                on_store=self.freezer.grew,
            )

        self.tenants: LoadingCache[TenantKey, Tenant | None] = cache(self._load_tenant)
        self.keys: LoadingCache[str, tuple[ApiKey, ...]] = cache(
            self.budgeted.wrap(self.db.keys_by_prefix)
        )
        self.challenges: LoadingCache[str, tuple[tuple[str, datetime], ...]] = cache(
            self.budgeted.wrap(self.db.challenges)
        )
        self._by_domain = self.budgeted.wrap(self.db.tenant_by_domain)
        self._by_slug = self.budgeted.wrap(self.db.tenant_by_slug)
        self.listener = ChangeListener(
            dsn, self.apply_change, self.flush, timeout_s=max(timeout_s, 2.0)
        )

    async def _load_tenant(self, key: TenantKey) -> Tenant | None:
        kind, value = key
        if kind == "domain":
            return await self._by_domain(value)
        if kind == "slug":
            return await self._by_slug(value)
        return await self.db.tenant_by_id(value)

    # -- TenantStore
    def cached_tenant(self, kind: TenantKind, value: str) -> Tenant | Missing | None:
        return self.tenants.cached((kind, value.lower() if kind == "slug" else value))

    async def by_custom_domain(self, host: str) -> Tenant | None:
        return await self.tenants.get(("domain", host))

    async def by_slug(self, slug: str) -> Tenant | None:
        return await self.tenants.get(("slug", slug.lower()))

    async def by_id(self, tenant_id: str) -> Tenant | None:
        return await self.tenants.get(("id", tenant_id))

    # -- KeyStore
    def cached_keys(self, prefix: str) -> Sequence[ApiKey] | Missing:
        return self.keys.cached(prefix)

    async def by_prefix(self, prefix: str) -> Sequence[ApiKey]:
        return await self.keys.get(prefix)

    async def key_by_id(self, key_id: str) -> ApiKey | None:
        """Uncached: asked by ``/explain`` only, which must see the row as it is now."""
        return await self.db.key_by_id(key_id)

    # -- ChallengeStore
    async def challenge_valid(self, domain: str, token: str, now: datetime) -> bool:
        return any(t == token and now < exp for t, exp in await self.challenges.get(domain))

    # -- invalidation
    def apply_change(self, change: dict[str, Any]) -> None:
        if change.get("all") or not isinstance(change.get("table"), str):
            self.flush()
            return
        domains = [d for d in change.get("domains", ()) if isinstance(d, str)]
        slugs = [s for s in change.get("slugs", ()) if isinstance(s, str)]
        tenant_id = change.get("tenant_id")
        if change["table"] == "tenant_domain_verifications":
            self.challenges.invalidate(domains)
            return
        evict: list[TenantKey] = [("domain", d) for d in domains] + [("slug", s) for s in slugs]
        if isinstance(tenant_id, str):
            evict.append(("id", tenant_id))
        self.tenants.invalidate(evict)
        self.keys.invalidate(p for p in change.get("prefixes", ()) if isinstance(p, str))

    def flush(self) -> None:
        self.tenants.clear()
        self.keys.clear()
        self.challenges.clear()

    async def ready(self) -> bool:
        """The database answers and invalidations are flowing: without the LISTEN link,
        cached entries could be stale for up to their TTL."""
        return self.listener.connected.is_set() and await self.db.ping()

    async def start(self) -> None:
        await self.db.start()
        self.listener.start()

    async def close(self) -> None:
        await self.listener.close()
        for cache in (self.tenants, self.keys, self.challenges):
            await cache.close()
        await self.db.close()
