"""The production identity store: Postgres behind loading caches, kept fresh by LISTEN/NOTIFY.

Implements ``TenantStore``, ``KeyStore`` and ``ChallengeStore``. A notification evicts exactly
the entries it names (see ``sql/003_edge_invalidation.sql``); an unreadable one, and every
(re)connection of the listener, flushes everything, since changes may have been missed.

Lookups by a name a client chose (a Host, a key prefix, a challenge's domain) go through the
miss budget (``stores.miss_budget``, CONTRACT §3). Lookups by tenant id come from key rows,
not from clients, and are not budgeted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from proxy.background import Once
from proxy.core.apikeys import ApiKey
from proxy.core.backoff import backoff_s
from proxy.core.tenancy import Tenant
from proxy.gcfreeze import freeze_long_lived
from proxy.stores.base import Missing, TenantKind
from proxy.stores.cached import LoadingCache
from proxy.stores.miss_budget import BudgetedLoads
from proxy.stores.postgres import DB_ERRORS, ChangeListener, PostgresStore
from proxy.stores.preload import NameIndex

TenantKey = tuple[str, str]  # ("domain" | "slug" | "id", value)
_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")
# Unknown names remembered per cache, apart from the known ones (stores.cached).
MAX_MISS_ENTRIES = 10_000
log = logging.getLogger("proxy.preload")


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
        preload_max_entries: int = 0,
    ) -> None:
        self.db = PostgresStore(dsn, timeout_s=timeout_s)
        # stores.preload: every name in memory, or (0, or too many) names looked up on use.
        self.index = NameIndex()
        self._preload_max = preload_max_entries
        self.preloaded = asyncio.Event()
        if not preload_max_entries:
            self.preloaded.set()
        self._touched: set[TenantKey] | None = None  # named by NOTIFY during a preload
        # A bug in a callback, or an unexpected answer: logged, counted, retried with backoff,
        # never a preload that died silently leaving /readyz at 503.
        self.preload = Once("preload", self._preload)
        self.budgeted = BudgetedLoads(max_miss_lookups_per_s, timeout_s, max_known=max_entries)
        # proxy.gcfreeze: the first preload's entries are frozen once it completes, nothing after.
        self.freeze: Callable[[], None] | None = freeze_long_lived

        def cache(
            load: Callable[[_K], Awaitable[_V]], maxsize: int = max_entries
        ) -> LoadingCache[_K, _V]:
            return LoadingCache(
                load,
                ttl_s=ttl_s,
                stale_if_error_s=stale_if_error_s,
                maxsize=maxsize,
                miss_maxsize=MAX_MISS_ENTRIES,
            )

        # A preload stores each tenant under its slug, its id and its domain.
        self.tenants: LoadingCache[TenantKey, Tenant | None] = cache(
            self._load_tenant, max(max_entries, 3 * preload_max_entries)
        )
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
    def _unknown(self, kind: TenantKind, value: str) -> bool:
        if kind == "slug":
            return not self.index.may_have_slug(value)
        return kind == "domain" and not self.index.may_have_domain(value)

    def cached_tenant(self, kind: TenantKind, value: str) -> Tenant | Missing | None:
        value = value.lower() if kind == "slug" else value
        if self._unknown(kind, value):
            return None
        return self.tenants.cached((kind, value))

    async def by_custom_domain(self, host: str) -> Tenant | None:
        if self._unknown("domain", host):
            return None
        return await self.tenants.get(("domain", host))

    async def by_slug(self, slug: str) -> Tenant | None:
        slug = slug.lower()
        if self._unknown("slug", slug):
            return None
        return await self.tenants.get(("slug", slug))

    async def by_id(self, tenant_id: str) -> Tenant | None:
        return await self.tenants.get(("id", tenant_id))

    # -- KeyStore
    def cached_keys(self, prefix: str) -> Sequence[ApiKey] | Missing:
        if not self.index.may_have_prefix(prefix):
            return ()
        return self.keys.cached(prefix)

    async def by_prefix(self, prefix: str) -> Sequence[ApiKey]:
        if not self.index.may_have_prefix(prefix):
            return ()
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
        prefixes = [p for p in change.get("prefixes", ()) if isinstance(p, str)]
        self.index.mention(slugs, domains, prefixes)
        evict: list[TenantKey] = [("domain", d) for d in domains] + [("slug", s) for s in slugs]
        if isinstance(tenant_id, str):
            evict.append(("id", tenant_id))
        if self._touched is not None:
            self._touched.update(evict)
        self.tenants.invalidate(evict)
        self.keys.invalidate(prefixes)

    def flush(self) -> None:
        """Everything may have changed (the LISTEN link was (re)connected, a table truncated):
        drop the caches, and load every name again when preloading."""
        self.tenants.clear()
        self.keys.clear()
        self.challenges.clear()
        if self._preload_max:
            self.index.reset()
            self.preload.restart()

    async def _preload(self) -> None:
        touched = self._touched = set()
        failures = 0
        started = time.monotonic()

        def on_tenant(t: Tenant) -> None:
            self.index.slugs.add(t.slug)
            keys: list[TenantKey] = [("slug", t.slug), ("id", t.id)]
            if t.custom_domain:
                self.index.domains.add(t.custom_domain)
                keys.append(("domain", t.custom_domain))
            for key in keys:
                if key not in touched:
                    self.tenants.prime(key, t)

        try:
            while True:
                try:
                    n = await self.db.stream_names(
                        self._preload_max, on_tenant, self.index.prefixes.add
                    )
                    break
                except DB_ERRORS as e:
                    failures += 1
                    delay = backoff_s(failures, base_s=0.5, cap_s=10.0, jitter=random.random())
                    log.warning("preload failed (%s); retrying in %.1fs", type(e).__name__, delay)
                    if await self.preload.sleep(delay):
                        return
        finally:
            # A restarted preload's set is not this one's to clear.
            if self._touched is touched:
                self._touched = None
        if n is None:
            log.warning(
                "preload: more than tenancy.preload_max_entries (%d) names; looking them up"
                " on use instead",
                self._preload_max,
            )
        else:
            self.index.complete = True
            log.info("preload: %d names in %.1f s", n, time.monotonic() - started)
        if self.freeze is not None:
            freeze, self.freeze = self.freeze, None
            freeze()
        self.preloaded.set()

    async def ready(self) -> bool:
        """The database answers and invalidations are flowing: without the LISTEN link,
        cached entries could be stale for up to their TTL."""
        return self.preloaded.is_set() and self.listener.connected.is_set() and await self.db.ping()

    async def start(self) -> None:
        await self.db.start()
        self.listener.start()

    async def close(self) -> None:
        await self.listener.close()  # first: its reconnection would start a preload again
        await self.preload.stop()
        for cache in (self.tenants, self.keys, self.challenges):
            await cache.close()
        await self.db.close()
