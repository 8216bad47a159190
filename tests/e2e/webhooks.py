"""Helpers of the webhook e2e tests: a loopback aiohttp receiver that records what it gets and
answers as a test scripts it, tenants and webhooks in real Postgres, and test settings with
short timeouts, lease and retry schedule."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from proxy.settings import WebhookSettings
from proxy.webhooks.runner import WebhookJobs

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()

# Receivers are on http://127.0.0.1: allowed by allow_http and allow_networks, as the
# deployment of a test needs; the defaults (https only, no private network) are tested apart.
TEST_SETTINGS = WebhookSettings(
    timeout_s=1.0,
    lease_s=1.5,
    retry_schedule_s=(0.3, 0.6, 0.9),
    allow_http=True,
    allow_networks=LOOPBACK,
)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()
    wall: float  # time.time(): comparable with Postgres's timestamps on this machine

    @property
    def event_id(self) -> str:
        return self.headers["webhook-id"]

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    """``statuses``: answers to the next requests, in order (then ``default``); ``hang``: never
    answer (a black hole); ``delay_s``: answer after this long."""

    statuses: list[int] = field(default_factory=list)
    default: int = 200
    hang: bool = False
    delay_s: float = 0.0
    text: str | None = None  # the body of every answer (default "answer <status>")
    stall_body: bool = False  # send the status and the first bytes of the body, then stall
    received: list[Received] = field(default_factory=list)
    port: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(
            Received(request.path, dict(request.headers), body, time.monotonic(), time.time())
        )
        self.arrived.set()
        if self.hang:
            await asyncio.Event().wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status = self.statuses.pop(0) if self.statuses else self.default
        if self.stall_body:
            stalled = web.StreamResponse(status=status)
            await stalled.prepare(request)
            await stalled.write(b"first bytes")
            await asyncio.Event().wait()
        if 300 <= status < 400:
            return web.Response(status=status, headers={"Location": self.url("/redirected")})
        # A cookie on every answer: a client keeping cookies would send it back.
        headers = {"Set-Cookie": f"session=s{len(self.received)}; Path=/"}
        return web.Response(status=status, text=self.text or f"answer {status}", headers=headers)

    def ids(self) -> list[str]:
        return [r.event_id for r in self.received]


@asynccontextmanager
async def receiving(**kwargs: Any) -> AsyncIterator[Receiver]:
    receiver = Receiver(**kwargs)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield receiver
    finally:
        await runner.cleanup()


def holds(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """A plain condition as the awaitable check that ``within`` polls."""

    async def poll() -> bool:
        return check()

    return poll


async def new_tenant(db: asyncpg.Connection) -> str:
    tenant_id = str(uuid.uuid4())
    await db.execute(
        "INSERT INTO identity.tenants (id, slug, name, status) VALUES ($1, $2, 'T', 'Active')",
        tenant_id,
        f"t{tenant_id[:8]}",
    )
    return tenant_id


async def add_webhook(
    db: asyncpg.Connection,
    tenant_id: str,
    url: str,
    events: list[str] | None = None,
    *,
    secret: str = SECRET,
    is_active: bool = True,
    disabled: bool = False,
) -> str:
    webhook_id: str = await db.fetchval(
        """INSERT INTO identity.tenant_webhooks (tenant_id, name, url, events, secret, is_active,
           disabled_at) VALUES ($1, 'hook', $2, $3, $4, $5, CASE WHEN $6 THEN now() END)
           RETURNING id::text""",
        tenant_id,
        url,
        events or ["*"],
        secret,
        is_active,
        disabled,
    )
    return webhook_id


async def publish(
    db: asyncpg.Connection,
    tenant_id: str,
    event_type: str = "render.completed",
    data: dict[str, Any] | None = None,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
) -> str:
    event_id = event_id or str(uuid.uuid4())
    await db.fetchval(
        "SELECT identity.publish_event($1, $2, $3, $4::jsonb, $5)",
        event_id,
        tenant_id,
        event_type,
        orjson.dumps(data or {}).decode(),
        occurred_at or datetime.now(UTC),
    )
    return event_id


async def attempts(db: asyncpg.Connection, webhook_id: str) -> list[asyncpg.Record]:
    return await db.fetch(
        """SELECT * FROM identity.tenant_webhook_deliveries WHERE webhook_id = $1
           ORDER BY event_id, attempt""",
        webhook_id,
    )


@asynccontextmanager
async def dispatching(dsn: str, **overrides: Any) -> AsyncIterator[WebhookJobs]:
    """The webhook jobs of one process, in this test's event loop."""
    job_args = ("telemetry", "access_log", "resolver", "poll_s")
    extra = {k: overrides.pop(k) for k in job_args if k in overrides}
    jobs = WebhookJobs(dsn, replace(TEST_SETTINGS, **overrides), **extra)
    await jobs.start()
    try:
        yield jobs
    finally:
        await jobs.stop()
