"""Postgres stores (schema ``identity``): tenants with branding and settings, API keys by prefix,
domain-verification challenges, and the LISTEN connection that carries invalidations.

Every call is bounded by ``timeout_s`` (no request waits longer on a dead database) and every
asyncpg/OS failure becomes ``TenantStoreUnavailable`` here, so stages never see asyncpg.
The pool starts with no connection (``min_size=0``): the proxy starts, and serves what it can,
while the database is still unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import date, datetime
from typing import Any, TypeVar

import asyncpg
import orjson

from proxy.background import Job
from proxy.core.apikeys import ApiKey
from proxy.core.tenancy import Branding, Tenant
from proxy.errors import TenantStoreUnavailable
from proxy.stores.preload import PROGRESS_EVERY_ROWS
from proxy.stores.usage import KeyUsage

log = logging.getLogger("proxy.postgres")
# Everything asyncpg or the network can raise at us; mapped at each store's boundary.
# InternalClientError: asyncpg's own protocol-state errors, e.g. "cannot switch to state 12;
# another operation is in progress" when a server shutdown cuts a statement short (seen in the
# 10 s outage test of issue 6: it killed the key-usage flusher with a traceback).
DB_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
CHANNEL = "flatrender_edge"
LISTENER_NAME = "flatrender-edge-listener"  # visible in pg_stat_activity
_T = TypeVar("_T")

_TENANT = """
SELECT t.id::text AS id, t.slug::text AS slug, t.status::text AS status,
       t.custom_domain::text AS custom_domain, t.domain_verified, t.allowed_origins,
       t.trial_ends_at, b.tenant_id IS NOT NULL AS has_branding, b.embed_enabled,
       b.embed_allowed_hosts, s.features::text AS features, t.monthly_render_qty
  FROM identity.tenants t
  LEFT JOIN identity.tenant_branding b ON b.tenant_id = t.id
  LEFT JOIN identity.tenant_settings s ON s.tenant_id = t.id
 WHERE t.deleted_at IS NULL AND {where}
"""
TENANT_BY_DOMAIN = _TENANT.format(where="t.custom_domain = $1::citext")
TENANT_BY_SLUG = _TENANT.format(where="t.slug = $1::citext")
TENANT_BY_ID = _TENANT.format(where="t.id = $1::uuid")

_KEYS = """
SELECT id::text AS id, tenant_id::text AS tenant_id, environment::text AS environment,
       key_prefix, key_hash, scopes, allowed_ips::text[] AS allowed_ips, rate_limit_rpm,
       is_active, expires_at, revoked_at
  FROM identity.tenant_api_keys
 WHERE {where}
"""
KEYS_BY_PREFIX = _KEYS.format(where="key_prefix = $1")
KEY_BY_ID = _KEYS.format(where="id = $1::uuid")

ALL_TENANTS = _TENANT.format(where="true")
PRELOAD_SIZE = """
SELECT (SELECT count(*) FROM identity.tenants WHERE deleted_at IS NULL)
     + (SELECT count(DISTINCT key_prefix) FROM identity.tenant_api_keys)
"""
ALL_PREFIXES = "SELECT DISTINCT key_prefix FROM identity.tenant_api_keys"

# One statement per flush for every key used since the last one. last_used_* only move forward
# (another proxy process may have written a later use already).
WRITE_USAGE = """
UPDATE identity.tenant_api_keys k
   SET usage_count = k.usage_count + u.n,
       last_used_ip = CASE WHEN k.last_used_at IS NULL OR u.at >= k.last_used_at
                           THEN u.ip ELSE k.last_used_ip END,
       last_used_at = GREATEST(k.last_used_at, u.at)
  FROM unnest($1::uuid[], $2::bigint[], $3::timestamptz[], $4::inet[]) AS u(id, n, at, ip)
 WHERE k.id = u.id
"""

# The month's renders started (CONTRACT §13): what a missing quota count is rebuilt from.
RENDERS_IN_MONTH = """
SELECT coalesce(sum(renders_started), 0)::bigint
  FROM identity.tenant_usage_daily
 WHERE tenant_id = $1::uuid AND usage_date >= $2::date
   AND usage_date < ($2::date + interval '1 month')
"""

CHALLENGES_BY_DOMAIN = """
SELECT challenge_token, expires_at
  FROM identity.tenant_domain_verifications
 WHERE domain = $1::citext AND method = 'HTTP_FILE' AND expires_at > now()
"""


def _tenant(row: asyncpg.Record) -> Tenant:
    features = orjson.loads(row["features"]) if row["features"] else {}
    return Tenant(
        id=row["id"],
        slug=row["slug"].lower(),
        status=row["status"],
        custom_domain=row["custom_domain"].lower() if row["custom_domain"] else None,
        domain_verified=row["domain_verified"],
        allowed_origins=tuple(row["allowed_origins"]),
        trial_ends_at=row["trial_ends_at"],
        branding=Branding(row["embed_enabled"], tuple(row["embed_allowed_hosts"]))
        if row["has_branding"]
        else None,
        features=features if isinstance(features, dict) else {},
        monthly_render_qty=row["monthly_render_qty"],
    )


def _key(row: asyncpg.Record) -> ApiKey:
    ips = row["allowed_ips"]
    return ApiKey(
        id=row["id"],
        tenant_id=row["tenant_id"],
        environment="test" if row["environment"] == "Test" else "live",
        key_prefix=row["key_prefix"],
        key_hash=row["key_hash"].lower(),
        scopes=tuple(row["scopes"]),
        allowed_ips=None
        if ips is None
        else tuple(ipaddress.ip_network(i, strict=False) for i in ips),
        rate_limit_rpm=row["rate_limit_rpm"],
        is_active=row["is_active"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
    )


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Release without a reset query. asyncpg still rolls back a transaction left open (locally
    decided, and only then a ROLLBACK is sent)."""


async def create_pool(
    dsn: str, *, timeout_s: float, max_size: int, reset_on_release: bool = True
) -> asyncpg.Pool:
    """A pool that starts with no connection (``min_size=0``): the proxy starts, and serves
    what it can, while the database is still unreachable.

    ``reset_on_release=False`` for a pool whose users never change session state (no ``SET``,
    ``LISTEN``, advisory locks or cursors outside a transaction): asyncpg's default reset
    (``RESET ALL``, ``UNLISTEN *``, ``pg_advisory_unlock_all()``...) is then a second round trip
    and a second transaction for every lookup."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        min_size=0,
        max_size=max_size,
        timeout=timeout_s,  # connect timeout of each new connection
        command_timeout=timeout_s,
        reset=None if reset_on_release else _keep_session,
    )
    return pool


async def close_pool(pool: asyncpg.Pool, timeout_s: float) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(pool.close(), timeout_s)


async def run_bounded(
    pool: asyncpg.Pool,
    fn: Callable[[asyncpg.Connection], Awaitable[_T]],
    timeout_s: float,
) -> _T:
    """``fn`` on a pooled connection, acquiring included, within ``timeout_s``.

    Raises one of ``DB_ERRORS``; the caller maps it to its own error at its boundary.
    """
    conn: asyncpg.Connection | None = None
    try:
        async with asyncio.timeout(timeout_s):
            conn = await pool.acquire()
            return await fn(conn)
    except (*DB_ERRORS, asyncio.CancelledError):
        if conn is not None:
            # A connection that missed its deadline (or whose caller's own deadline cancelled
            # it) is stuck mid-query: releasing it would wait for asyncpg's reset on a database
            # that does not answer. Drop it instead.
            conn.terminate()
        raise
    finally:
        if conn is not None:
            await pool.release(conn)


class PostgresStore:
    """Uncached loads; ``stores.cached`` puts the caches in front of them."""

    def __init__(self, dsn: str, *, timeout_s: float, max_connections: int = 10) -> None:
        self._dsn = dsn
        self._timeout = timeout_s
        self._max = max_connections
        self._pool: asyncpg.Pool | None = None
        self.errors = 0

    async def start(self) -> None:
        # Lookups and usage writes are single statements (or managed transactions): no
        # session state to reset between two of them.
        self._pool = await create_pool(
            self._dsn, timeout_s=self._timeout, max_size=self._max, reset_on_release=False
        )

    async def close(self) -> None:
        if self._pool is not None:
            await close_pool(self._pool, self._timeout)

    async def _run(self, fn: Callable[[asyncpg.Connection], Awaitable[_T]]) -> _T:
        assert self._pool is not None, "start() first"
        try:
            return await run_bounded(self._pool, fn, self._timeout)
        except DB_ERRORS as e:
            self.errors += 1
            log.warning("tenant store unavailable: %s", type(e).__name__)
            raise TenantStoreUnavailable() from None

    async def _tenant_by(self, sql: str, value: str) -> Tenant | None:
        row = await self._run(lambda c: c.fetchrow(sql, value))
        return None if row is None else _tenant(row)

    async def tenant_by_domain(self, host: str) -> Tenant | None:
        return await self._tenant_by(TENANT_BY_DOMAIN, host)

    async def tenant_by_slug(self, slug: str) -> Tenant | None:
        return await self._tenant_by(TENANT_BY_SLUG, slug)

    async def tenant_by_id(self, tenant_id: str) -> Tenant | None:
        return await self._tenant_by(TENANT_BY_ID, tenant_id)

    async def keys_by_prefix(self, prefix: str) -> tuple[ApiKey, ...]:
        rows = await self._run(lambda c: c.fetch(KEYS_BY_PREFIX, prefix))
        return tuple(_key(r) for r in rows)

    async def key_by_id(self, key_id: str) -> ApiKey | None:
        row = await self._run(lambda c: c.fetchrow(KEY_BY_ID, key_id))
        return None if row is None else _key(row)

    async def challenges(self, domain: str) -> tuple[tuple[str, datetime], ...]:
        rows = await self._run(lambda c: c.fetch(CHALLENGES_BY_DOMAIN, domain))
        return tuple((r["challenge_token"], r["expires_at"]) for r in rows)

    async def write_usage(self, usage: Mapping[str, KeyUsage]) -> None:
        ids = list(usage)
        await self._run(
            lambda c: c.execute(
                WRITE_USAGE,
                ids,
                [usage[i].count for i in ids],
                [usage[i].last_used_at for i in ids],
                [usage[i].last_used_ip for i in ids],
            )
        )

    async def stream_names(
        self,
        max_entries: int,
        on_tenant: Callable[[Tenant], None],
        on_prefix: Callable[[str], None],
    ) -> int | None:
        """Every tenant and key prefix from one snapshot, streamed with a cursor on a
        connection of its own (no statement timeout: 2,000,000 rows take a while); None,
        having streamed nothing, when there are more than ``max_entries``. Raises one of
        ``DB_ERRORS``."""
        conn: asyncpg.Connection = await asyncpg.connect(self._dsn, timeout=self._timeout)
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                size: int = await conn.fetchval(PRELOAD_SIZE)
                if size > max_entries:
                    return None
                n = 0
                async for row in conn.cursor(ALL_TENANTS, prefetch=5000):
                    on_tenant(_tenant(row))
                    n += 1
                    if n % PROGRESS_EVERY_ROWS == 0:
                        log.info("preload: %d of %d names", n, size)
                async for row in conn.cursor(ALL_PREFIXES, prefetch=20000):
                    on_prefix(row[0])
                    n += 1
                    if n % PROGRESS_EVERY_ROWS == 0:
                        log.info("preload: %d of %d names", n, size)
                return n
        finally:
            conn.terminate()

    async def renders_in_month(self, tenant_id: str, first_day: date) -> int:
        n: int = await self._run(lambda c: c.fetchval(RENDERS_IN_MONTH, tenant_id, first_day))
        return n

    async def ping(self) -> bool:
        try:
            await self._run(lambda c: c.fetchval("SELECT 1"))
        except TenantStoreUnavailable:
            return False
        return True


class ChangeListener(Job):
    """Holds a LISTEN connection; calls ``on_change(payload)`` per notification, and
    ``on_reconnect()`` each time listening (re)starts, since changes made while it was not
    listening were missed. Reconnects with capped backoff; pings to notice a dead link. Any
    other exception (a bug in a callback, say) is the job base's: logged, counted, restarted
    with backoff, so changes never stop arriving for good."""

    def __init__(
        self,
        dsn: str,
        on_change: Callable[[dict[str, Any]], None],
        on_reconnect: Callable[[], None],
        *,
        timeout_s: float,
        ping_interval_s: float = 5.0,
        channel: str = CHANNEL,
        application_name: str = LISTENER_NAME,
    ) -> None:
        self._dsn = dsn
        self._channel = channel
        self._application_name = application_name
        self._on_change = on_change
        self._on_reconnect = on_reconnect
        self._timeout = timeout_s
        self._ping_interval = ping_interval_s
        self._lost = asyncio.Event()  # the current connection's: set when it ends, or on stop
        self.connected = asyncio.Event()
        self.reconnects = 0
        super().__init__(application_name)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            data = {"all": True}
        self._on_change(data if isinstance(data, dict) else {"all": True})

    async def _listen_once(self) -> None:
        conn: asyncpg.Connection = await asyncpg.connect(
            self._dsn,
            timeout=self._timeout,
            server_settings={"application_name": self._application_name},
        )
        self._lost = lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        try:
            if self.stopping:
                return
            await conn.add_listener(self._channel, self._notified)
            self._on_reconnect()
            self.reconnects += 1
            self.connected.set()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), self._ping_interval)
                    break
                await conn.fetchval("SELECT 1", timeout=self._timeout)
        finally:
            self.connected.clear()
            conn.terminate()

    async def run(self) -> None:
        delay = 0.1
        while not self.stopping:
            try:
                await self._listen_once()
                delay = 0.1
            except DB_ERRORS as e:  # expected while Postgres is away: not a failure of the job
                log.warning(
                    "LISTEN connection lost (%s); retrying in %.1fs", type(e).__name__, delay
                )
            self.succeeded()
            if await self.sleep(delay):
                return
            delay = min(delay * 2, 2.0)

    def wake(self) -> None:
        self._lost.set()

    async def close(self) -> None:
        await self.stop()
