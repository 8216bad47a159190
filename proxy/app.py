"""Composition root: build the stores, the stages and the aiohttp applications from Settings.

The order of stages is the order of DESIGN.md: entry (request id, errors) → target (Host, path)
→ tenant → route → auth → forward. Everything a request needs is built here once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from proxy.core.routes import RouteTable
from proxy.pipeline.auth import auth_stage
from proxy.pipeline.entry import entry_stage, stamp_response
from proxy.pipeline.forward import Forwarder
from proxy.pipeline.routing import route_stage, target_stage
from proxy.pipeline.tenant import tenant_stage
from proxy.settings import ConfigError, Settings
from proxy.stores.base import KeyStore, TenantStore
from proxy.stores.memory import load_embedded
from proxy.upstreams import build_pools

log = logging.getLogger("proxy")


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Stores:
    tenants: TenantStore
    keys: KeyStore


def build_stores(settings: Settings) -> Stores:
    if settings.database_url is not None:
        # The Postgres stores arrive with the tenancy and API-key issues; refusing to start is
        # the safe answer until then (never serve a database deployment from a demo file).
        raise ConfigError("DATABASE_URL: the Postgres tenant store is not available yet")
    tenants, keys = load_embedded(settings.tenancy.embedded_file)
    return Stores(tenants=tenants, keys=keys)


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
            auth_stage(stores.keys, stores.tenants, clock),
        ],
    )
    forwarder = Forwarder(pools, settings.server.max_body_bytes)
    app.router.add_route("*", "/{tail:.*}", forwarder)
    app.on_response_prepare.append(stamp_response)

    async def close_pools(_app: web.Application) -> AsyncIterator[None]:
        yield
        await asyncio.gather(*(p.close() for p in pools.values()))

    app.cleanup_ctx.append(close_pools)
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
