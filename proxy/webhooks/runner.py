"""The webhook background jobs of one process: the dispatcher, its LISTEN connection, retention
and the figures behind /metrics. Started by every ``serve`` in database mode (unless
``webhooks.enabled = false``) and by ``python -m proxy webhooks run``. Each is a
``proxy.background.Job``: an unexpected exception is logged, counted and followed by a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import aiohttp
import asyncpg
from aiohttp import web
from aiohttp.abc import AbstractResolver
from prometheus_client.core import Metric

from proxy.access_log import AccessLog
from proxy.background import Job, Periodic, job_failures
from proxy.settings import HostPort, Settings, WebhookSettings
from proxy.stores.postgres import DB_ERRORS, ChangeListener, close_pool, create_pool
from proxy.telemetry import Telemetry, gauge
from proxy.webhooks.destinations import GuardedResolver, Policy
from proxy.webhooks.dispatcher import ATTEMPT_OUTCOMES, POLL_S, Dispatcher
from proxy.webhooks.store import NOTIFY_CHANNEL, DeliveryStore

log = logging.getLogger("proxy.webhooks")

DB_TIMEOUT_S = 10.0
POOL_SIZE = 8
FIGURES_EVERY_S = 5.0
RETENTION_EVERY_S = 3600.0
RETENTION_BATCH = 500
# Between two retention batches: deleting is never allowed to crowd out the deliveries.
RETENTION_PAUSE_S = 0.1


class WebhookJobs:
    def __init__(
        self,
        dsn: str,
        settings: WebhookSettings,
        *,
        telemetry: Telemetry | None = None,
        access_log: AccessLog | None = None,
        resolver: AbstractResolver | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        poll_s: float = POLL_S,
    ) -> None:
        self._dsn = dsn
        self._settings = settings
        self._telemetry = telemetry
        self._access_log = access_log
        self._resolver = resolver
        self._clock = clock
        self._rand = rand
        self._poll_s = poll_s
        self._pool: asyncpg.Pool | None = None
        self._session: aiohttp.ClientSession | None = None
        self._listener: ChangeListener | None = None
        self._jobs: list[Job] = []
        self.dispatcher: Dispatcher | None = None
        self.due = 0
        self.disabled = 0
        if telemetry is not None:
            telemetry.collect_from(self._metrics)
            telemetry.webhook_outcomes(ATTEMPT_OUTCOMES)

    @property
    def jobs(self) -> list[Job]:
        """For ``edge_background_job_failures`` (the server's collector lists them)."""
        return list(self._jobs)

    @property
    def listening(self) -> bool:
        """True while the LISTEN connection is up (NOTIFY wakes the dispatcher)."""
        return self._listener is not None and self._listener.connected.is_set()

    async def start(self) -> None:
        s = self._settings
        if self._access_log is not None:
            self._access_log.start()
        self._pool = await create_pool(self._dsn, timeout_s=DB_TIMEOUT_S, max_size=POOL_SIZE)
        policy = Policy(allow_http=s.allow_http, allow_networks=s.allow_networks)
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self._resolver or aiohttp.DefaultResolver(), policy),
            limit=s.max_in_flight,
        )
        # One session for every attempt; no cookies carried from one tenant's receiver to
        # another's; no proxy from the environment; redirects are refused per request.
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=s.timeout_s),
            trust_env=False,
        )
        store = DeliveryStore(self._pool, lease_s=s.lease_s)
        self.dispatcher = Dispatcher(
            store,
            self._session,
            policy,
            s,
            clock=self._clock,
            random=self._rand,
            telemetry=self._telemetry,
            access_log=self._access_log,
            poll_s=self._poll_s,
        )
        dispatcher = self.dispatcher
        self._listener = ChangeListener(
            self._dsn,
            lambda _payload: dispatcher.wake(),
            dispatcher.wake,  # notifications missed while reconnecting
            timeout_s=DB_TIMEOUT_S,
            channel=NOTIFY_CHANNEL,
            application_name="flatrender-edge-webhooks",
        )
        retention = Periodic(
            "webhook-retention",
            RETENTION_EVERY_S,
            lambda: delete_expired(store, self._settings.retention_days, retention),
            at_start=True,
            on_stop=False,
        )
        self._jobs = [
            dispatcher,
            self._listener,
            retention,
            Periodic(
                "webhook-figures",
                FIGURES_EVERY_S,
                lambda: self._figures(store),
                at_start=True,
                on_stop=False,
            ),
        ]
        for job in self._jobs:
            job.start()

    async def stop(self) -> None:
        """Stop claiming, let the attempts in flight finish and be recorded (up to
        ``timeout_s``), then close everything."""
        for job in self._jobs:
            await job.stop()
        if self._session is not None:
            await self._session.close()
        if self._pool is not None:
            await close_pool(self._pool, DB_TIMEOUT_S)
        if self._access_log is not None:
            await self._access_log.close()

    async def _figures(self, store: DeliveryStore) -> None:
        # The dispatcher logs an outage; the gauges keep their last value meanwhile.
        with contextlib.suppress(*DB_ERRORS):
            self.due, self.disabled = await store.figures()

    def _metrics(self) -> Iterator[Metric]:
        yield gauge(
            "edge_webhook_attempts_due",
            "Webhook attempts due and not yet made (whole deployment)",
            self.due,
        )
        yield gauge("edge_webhooks_disabled", "Webhooks disabled (whole deployment)", self.disabled)
        if self.dispatcher is not None:
            yield gauge(
                "edge_webhook_attempts_in_flight",
                "Webhook attempts being made by this process",
                self.dispatcher.in_flight,
            )


async def delete_expired(store: DeliveryStore, days: int, job: Job) -> None:
    """Retention: batches until nothing is left, or until ``job`` is stopping (checked between
    batches, and its pause ends at once on stop)."""
    try:
        while not job.stopping:
            if not await store.delete_expired(days, RETENTION_BATCH):
                return
            if await job.sleep(RETENTION_PAUSE_S):
                return
    except DB_ERRORS as e:
        log.warning("webhook retention: database unavailable (%s)", type(e).__name__)


def webhook_jobs(settings: Settings, telemetry: Telemetry | None) -> WebhookJobs | None:
    """The jobs a ``serve`` runs: none in embedded mode or with ``webhooks.enabled = false``."""
    if settings.database_url is None or not settings.webhooks.enabled:
        return None
    return WebhookJobs(
        settings.database_url,
        settings.webhooks,
        telemetry=telemetry,
        access_log=AccessLog() if settings.telemetry.access_log else None,
    )


async def run_alone(settings: Settings, admin_listen: HostPort | None = None) -> None:
    """``python -m proxy webhooks run``: the jobs until SIGTERM/SIGINT, then a clean stop; with
    ``admin_listen``, ``/metrics`` and ``/healthz`` there meanwhile."""
    from proxy.app import build_health_app  # the server's module imports this one

    telemetry = Telemetry(settings.telemetry)
    alone = replace(settings, webhooks=replace(settings.webhooks, enabled=True))
    jobs = webhook_jobs(alone, telemetry)
    assert jobs is not None
    telemetry.collect_from(lambda: [job_failures(jobs.jobs)])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    admin: web.AppRunner | None = None
    if admin_listen is not None:
        admin = web.AppRunner(build_health_app(telemetry), access_log=None)
        await admin.setup()
        await web.TCPSite(admin, admin_listen.host, admin_listen.port).start()
    await jobs.start()
    log.warning("webhook dispatcher running (admin on %s)", admin_listen)
    try:
        await stop.wait()
    finally:
        await jobs.stop()
        if admin is not None:
            await admin.cleanup()
        telemetry.shutdown()
