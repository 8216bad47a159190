"""The domain verifier (CONTRACT §12): one pass over the rows that are due, and the job that
runs passes in every ``serve`` of a database deployment while only one of them checks.

Which process checks is decided by a session-level Postgres advisory lock taken on the job's
own connection: it is held while the connection lives, so when its process dies Postgres ends
the session, frees the lock, and another process takes it at its next try (every second; a
blocking ``pg_advisory_lock`` would take it sooner but could not be interrupted by ``stop``).
The holder also claims each row before checking it (``DomainStore.claim_due``), so ``domains
check`` run by hand never doubles a check either.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg
from prometheus_client.core import Metric

from proxy.background import Job
from proxy.core.backoff import backoff_s
from proxy.domains.checks import Checker, Outcome
from proxy.domains.rules import domain_refusal
from proxy.domains.store import DomainStore, DueCheck
from proxy.stores.postgres import DB_ERRORS
from proxy.telemetry import counter, gauge

log = logging.getLogger("proxy.domains")

# Any constant shared by every process of a deployment: b"edgedoms" read as a bigint.
LOCK_KEY = 0x65646765646F6D73
APPLICATION_NAME = "flatrender-edge-domain-verifier"  # visible in pg_stat_activity
# A claimed row is due again after this if its checker never records the check (it died).
LEASE = timedelta(seconds=60)
PASS_LIMIT = 100  # rows per `domains check` pass; the rest are due at the next one
CONCURRENCY = 16  # checks in flight at once, and rows the job claims at most
STATEMENT_TIMEOUT_S = 10.0
METHODS = ("HTTP_FILE", "DNS_TXT")
OUTCOMES = ("passed", "failed")


@dataclass
class CheckCounters:
    by_method_outcome: dict[tuple[str, str], int] = field(
        default_factory=lambda: {(m, o): 0 for m in METHODS for o in OUTCOMES}
    )

    def count(self, method: str, outcome: Outcome) -> None:
        key = (method, "passed" if outcome.verified else "failed")
        self.by_method_outcome[key] = self.by_method_outcome.get(key, 0) + 1

    def metrics(self) -> Iterator[Metric]:
        yield counter(
            "edge_domain_checks",
            "Custom-domain checks made by this process, by method and outcome",
            ["method", "outcome"],
            [([m, o], n) for (m, o), n in sorted(self.by_method_outcome.items())],
        )


@dataclass(frozen=True, slots=True)
class CheckReport:
    """One check, as ``domains check`` prints it."""

    id: str
    domain: str
    method: str
    verified: bool
    error: str | None

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "domain": self.domain,
            "method": self.method,
            "verified": self.verified,
            "error": self.error,
        }


async def check_and_record(
    store: DomainStore,
    checker: Checker,
    clock: Callable[[], datetime],
    platform_domains: tuple[str, ...],
    counters: CheckCounters,
    row: DueCheck,
) -> CheckReport:
    """Check one claimed row and record the check (the schedule's next time included)."""
    if domain_refusal(row.domain, platform_domains) is not None:
        # A row written by another client may name a host that must never be verified (§3).
        outcome = Outcome(False, "domain_not_allowed")
    else:
        try:
            outcome = await checker.check(row.method, row.domain, row.token)
        except Exception:
            # One row that breaks a check (a name another client wrote, a library's bug)
            # must not keep the other rows' checks from being recorded.
            log.exception("domain check of %s failed unexpectedly", row.domain)
            outcome = Outcome(False, "check_failed")
    await store.record(row, outcome.verified, clock())
    counters.count(row.method, outcome)
    if outcome.verified:
        log.warning("custom domain %s verified (%s)", row.domain, row.method)
    return CheckReport(row.id, row.domain, row.method, outcome.verified, outcome.error)


async def run_pass(
    store: DomainStore,
    checker: Checker,
    clock: Callable[[], datetime],
    platform_domains: tuple[str, ...],
    counters: CheckCounters,
    domain: str | None = None,
) -> list[CheckReport]:
    """One pass, as ``domains check`` makes it: claim the rows that are due (with ``domain``:
    its pending rows whatever their schedule), check them concurrently, record each check.
    Returns what was checked, once every check is done."""
    now = clock()
    due = await store.claim_due(now, now + LEASE, domain, PASS_LIMIT)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(row: DueCheck) -> CheckReport:
        async with gate:
            return await check_and_record(store, checker, clock, platform_domains, counters, row)

    return list(await asyncio.gather(*(one(row) for row in due)))


class DomainVerifier(Job):
    """The background job: takes the lock, then claims due rows every ``interval_s`` while
    earlier checks run; a process that does not hold the lock tries again at the same pace."""

    def __init__(
        self,
        dsn: str,
        checker: Checker,
        clock: Callable[[], datetime],
        platform_domains: tuple[str, ...],
        *,
        interval_s: float = 1.0,
        connect_timeout_s: float = 5.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        super().__init__("domain-verifier", jitter=jitter)
        self._dsn = dsn
        self._checker = checker
        self._clock = clock
        self._platform = platform_domains
        self._interval = interval_s
        self._connect_timeout = connect_timeout_s
        self._draw = jitter
        self._outages = 0  # consecutive failures to reach the database
        self.counters = CheckCounters()
        self.holding = False  # this process is the deployment's checker right now

    async def run(self) -> None:
        while not self.stopping:
            try:
                await self._connected()
            except DB_ERRORS as e:
                # An outage is expected weather, not a bug: a warning, and a wait that grows.
                self._outages += 1
                delay = backoff_s(self._outages, base_s=1.0, cap_s=30.0, jitter=self._draw())
                log.warning(
                    "domain verifier: database unavailable (%s); retrying in %.1fs",
                    type(e).__name__,
                    delay,
                )
                await self.sleep(delay)

    async def _connected(self) -> None:
        conn: asyncpg.Connection = await asyncpg.connect(
            self._dsn,
            timeout=self._connect_timeout,
            # A database that stops answering mid-statement must not hang the job for ever.
            command_timeout=STATEMENT_TIMEOUT_S,
            server_settings={"application_name": APPLICATION_NAME},
        )
        self._outages = 0
        try:
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
                if await self.sleep(self._interval):
                    return
            self.holding = True
            await self._check_continuously(DomainStore(conn))
        finally:
            self.holding = False
            # Ends the session, and with it the lock, at once (no unlock round trip to wait for).
            conn.terminate()

    async def _check_continuously(self, store: DomainStore) -> None:
        """Claim every ``interval_s`` as many due rows as there are free slots, each checked by
        a task of its own that records its own result: a row added now is checked within a
        second or so, however long the checks already running take (5 s for a black hole)."""
        running: set[asyncio.Task[CheckReport]] = set()

        def finished(task: asyncio.Task[CheckReport]) -> None:
            running.discard(task)
            if task.cancelled() or task.exception() is None:
                return
            error = task.exception()
            if isinstance(error, DB_ERRORS):
                # The claim that follows meets the same outage and reconnects; the row's
                # lease makes it due again.
                log.warning("domain verifier: a check was not recorded (%s)", type(error).__name__)
            else:
                self.failures += 1
                log.error("domain verifier: recording a check failed", exc_info=error)

        try:
            while True:
                free = CONCURRENCY - len(running)
                if free > 0:
                    now = self._clock()
                    for row in await store.claim_due(now, now + LEASE, None, free):
                        task = asyncio.create_task(
                            check_and_record(
                                store,
                                self._checker,
                                self._clock,
                                self._platform,
                                self.counters,
                                row,
                            )
                        )
                        running.add(task)
                        task.add_done_callback(finished)
                self.succeeded()
                if await self.sleep(self._interval):
                    return
        finally:
            # Stopping or reconnecting: checks cut short are due again when their lease ends.
            tasks = list(running)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def metrics(self) -> Iterator[Metric]:
        yield from self.counters.metrics()
        yield gauge(
            "edge_domain_verifier_active",
            "1 while this process holds the lock and checks for the whole deployment",
            1 if self.holding else 0,
        )
