"""Composition root: build the stores, the stages and the aiohttp applications from Settings.

The order of stages follows DESIGN.md: entry (request id, errors) → target (Host, path) →
tenant → route → audit → auth → rate limit → forward. Audit sits outside auth and rate limiting
so that their refusals are recorded too (CONTRACT §9). Everything is built here once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from proxy.audit.jsonl import JsonlAuditSink
from proxy.core.routes import RouteTable
from proxy.pipeline.audit import audit_stage
from proxy.pipeline.auth import auth_stage
from proxy.pipeline.entry import entry_stage, stamp_response
from proxy.pipeline.forward import Forwarder
from proxy.pipeline.ratelimit import ratelimit_stage
from proxy.pipeline.routing import route_stage, target_stage
from proxy.pipeline.tenant import tenant_stage
from proxy.settings import ConfigError, Settings
from proxy.stores.base import AuditSink, BucketStore, KeyStore, TenantStore
from proxy.stores.buckets import MemoryBucketStore
from proxy.stores.memory import load_embedded
from proxy.upstreams import build_pools

log = logging.getLogger("proxy")


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Stores:
    tenants: TenantStore
    keys: KeyStore
    buckets: BucketStore
    audit: AuditSink


def build_stores(settings: Settings) -> Stores:
    # The Postgres and Redis stores arrive with their own issues; until then refusing to start
    # is the safe answer (never serve a database deployment from the demo file, nor pretend
    # that per-process buckets are the shared limit an operator configured).
    if settings.database_url is not None:
        raise ConfigError("DATABASE_URL: the Postgres stores are not available in this version")
    if settings.redis_url is not None:
        raise ConfigError("REDIS_URL: the Redis bucket store is not available in this version")
    tenants, keys = load_embedded(settings.tenancy.embedded_file)
    return Stores(
        tenants=tenants,
        keys=keys,
        buckets=MemoryBucketStore(),
        audit=JsonlAuditSink(settings.audit.jsonl_path, settings.audit.flush_interval_ms),
    )


def build_app(
    settings: Settings, stores: Stores, clock: Callable[[], datetime] = utc_now
) -> web.Application:
    pools = build_pools(settings.upstreams)
    app = web.Application(
        middlewares=[
            entry_stage(settings.server.trusted_proxies),
            target_stage,
            tenant_stage(stores.tenants, settings.tenancy.platform_domains, clock),
            route_stage(RouteTable(settings.routes)),
            audit_stage(stores.audit, clock),
            auth_stage(stores.keys, stores.tenants, clock),
            ratelimit_stage(stores.buckets, settings.ratelimit.shadow),
        ],
    )
    forwarder = Forwarder(pools, settings.server.max_body_bytes)
    app.router.add_route("*", "/{tail:.*}", forwarder)
    app.on_response_prepare.append(stamp_response)

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await stores.audit.start()
        yield
        # Runs after in-flight requests finished: every row they submitted is written.
        await stores.audit.close()
        await asyncio.gather(*(p.close() for p in pools.values()))

    app.cleanup_ctx.append(lifecycle)
    return app


def build_admin_app() -> web.Application:
    """The admin listener: never on the public port (CONTRACT §10)."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    admin = web.Application()
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", healthz)  # embedded stores are always ready
    return admin


def runner_kwargs(settings: Settings) -> dict[str, object]:
    s = settings.server
    return {
        "access_log": None,
        "max_line_size": s.max_line_size,
        "max_field_size": s.max_field_size,
        "keepalive_timeout": s.keepalive_timeout_s,
        # Request bodies pass through byte for byte, Content-Encoding and all.
        "auto_decompress": False,
    }


async def serve(settings: Settings, stores: Stores) -> None:
    """Run until SIGTERM/SIGINT, then stop accepting and let in-flight requests finish."""
    app = build_app(settings, stores)
    runner = web.AppRunner(app, **runner_kwargs(settings))  # type: ignore[arg-type]
    admin = web.AppRunner(build_admin_app(), access_log=None)
    await runner.setup()
    await admin.setup()
    s = settings.server
    site = web.TCPSite(
        runner,
        s.listen.host,
        s.listen.port,
        reuse_port=True,
        backlog=1024,
        shutdown_timeout=s.shutdown_timeout_s,
    )
    await site.start()
    await web.TCPSite(admin, s.admin_listen.host, s.admin_listen.port).start()
    log.warning("listening on %s, admin on %s", s.listen, s.admin_listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.warning("shutting down")
    await admin.cleanup()
    await runner.cleanup()
