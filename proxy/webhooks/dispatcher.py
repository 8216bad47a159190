"""The dispatcher: claim due attempts, send them, record what happened (CONTRACT §11).

One loop claims as many due attempts as this process has room for (``max_in_flight`` in all,
``max_in_flight_per_webhook`` per webhook, so a black-holed receiver holds at most its own
slots), starts one task per attempt, and waits for whichever comes first: a NOTIFY from
``publish_event`` or ``replay`` (``wake``), a slot freed by a finished attempt, or the time
the earliest waiting attempt is due. Every attempt sends the same ``webhook-id`` (the event
id) so that receivers can deduplicate the repeats that at-least-once delivery implies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from opentelemetry.trace import SpanKind

from proxy.access_log import AccessLog
from proxy.background import Job
from proxy.core.backoff import backoff_s
from proxy.core.schedules import webhook_retry_delay
from proxy.read_capped import read_capped
from proxy.settings import WebhookSettings
from proxy.stores.postgres import DB_ERRORS
from proxy.telemetry import Telemetry
from proxy.webhooks.destinations import DestinationNotAllowed, Policy
from proxy.webhooks.signing import signed_headers
from proxy.webhooks.store import Claim, DeliveryStore, Outcome

log = logging.getLogger("proxy.webhooks")

# Postgres text cannot hold NUL; the contract keeps the first 4096 characters of a body.
RESPONSE_BODY_CHARS = 4096
_READ_BYTES = RESPONSE_BODY_CHARS * 4  # enough UTF-8 for 4096 characters
# Longest wait between two looks at the table when no NOTIFY comes (a lost notification, a
# lease that ended in another process): a due attempt still starts within this.
POLL_S = 1.0
_MIN_WAIT_S = 0.05
# aiohttp's own total timeout would also cover the body; ``send`` keeps the deadline itself.
_OWN_DEADLINE = aiohttp.ClientTimeout(total=None)


# Every value of edge_webhook_attempts_total's ``outcome`` label (a bounded set: never the
# status or the URL), exposed at zero before the first attempt of each.
ATTEMPT_OUTCOMES = (
    "success",
    "http_error",
    "timeout",
    "connection_failed",
    "destination_not_allowed",
)


def outcome_label(error: str | None) -> str:
    if error is None:
        return "success"
    return "http_error" if error.startswith("http_") else error


class Dispatcher(Job):
    def __init__(
        self,
        store: DeliveryStore,
        session: aiohttp.ClientSession,
        policy: Policy,
        settings: WebhookSettings,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        random: Callable[[], float],
        telemetry: Telemetry | None = None,
        access_log: AccessLog | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        super().__init__("webhook-dispatcher")
        self._store = store
        self._session = session
        self._policy = policy
        self._settings = settings
        self._clock = clock
        self._monotonic = monotonic
        self._random = random
        self._telemetry = telemetry
        self._access_log = access_log
        self._poll_s = poll_s
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._per_webhook: Counter[str] = Counter()
        self.attempts: Counter[str] = Counter()  # by outcome label
        self.db_errors = 0

    def wake(self) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def run(self) -> None:
        """Claim and start attempts until ``stop``; database failures back off and retry."""
        s = self._settings
        outage = 0
        while not self.stopping:
            self._wake.clear()  # before the claim: a NOTIFY during it is not lost
            room = s.max_in_flight - len(self._in_flight)
            claimed: list[Claim] = []
            try:
                if room > 0:
                    claimed = await self._store.claim(
                        room,
                        {w: s.max_in_flight_per_webhook - n for w, n in self._per_webhook.items()},
                        s.max_in_flight_per_webhook,
                    )
                for claim in claimed:
                    self._start(claim)
                if room > 0 and len(claimed) == room:
                    continue  # a full claim: more may be due
                wait = self._poll_s
                if room > 0:
                    full = [
                        w for w, n in self._per_webhook.items() if n >= s.max_in_flight_per_webhook
                    ]
                    due_in = await self._store.next_due_in(full)
                    if due_in is not None:
                        wait = min(wait, max(due_in, _MIN_WAIT_S))
                outage = 0
                self.succeeded()
            except DB_ERRORS as e:
                outage += 1
                self.db_errors += 1
                wait = backoff_s(outage, base_s=0.1, cap_s=5.0, jitter=self._random())
                log.warning("webhook dispatcher: database unavailable (%s)", type(e).__name__)
            if not self.stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)

    async def stop(self) -> None:
        self._wake.set()  # the loop waits on this, not on the base's stop event
        await super().stop()

    async def finish(self) -> None:
        """Give the attempts in flight ``timeout_s`` (and a second to record) to finish; any
        left are abandoned to their lease, made again by whichever dispatcher comes next."""
        if self._in_flight:
            grace = self._settings.timeout_s + 1
            _done, pending = await asyncio.wait(set(self._in_flight), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    def _start(self, claim: Claim) -> None:
        self._per_webhook[claim.webhook_id] += 1
        task = asyncio.create_task(self._attempt(claim))
        self._in_flight.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._in_flight.discard(t)
            self._per_webhook[claim.webhook_id] -= 1
            if self._per_webhook[claim.webhook_id] <= 0:
                del self._per_webhook[claim.webhook_id]
            self._wake.set()  # a slot is free

        task.add_done_callback(done)

    async def _attempt(self, claim: Claim) -> None:
        try:
            if not claim.deliverable:
                await self._store.end_claimed(claim)
                return
            span = (
                self._telemetry.span("webhook attempt", SpanKind.CLIENT)
                if self._telemetry is not None
                else None
            )
            if span is None:
                outcome = await self.send(claim)
                await self._record(claim, outcome, None)
            else:
                with span as current:
                    outcome = await self.send(claim)
                    await self._record(claim, outcome, current)
        except DB_ERRORS as e:
            # Not recorded: the lease ends and the attempt is made again (at least once).
            self.db_errors += 1
            log.warning("webhook attempt not recorded: database unavailable (%s)", type(e).__name__)
        except Exception:
            log.exception("webhook attempt %s failed unexpectedly", claim.id)

    async def send(self, claim: Claim) -> Outcome:
        """Make one attempt: the request of CONTRACT §11, or nothing when the destination is
        refused."""
        try:
            self._policy.check_url(claim.url)
        except DestinationNotAllowed:
            return Outcome(None, None, 0, "destination_not_allowed")
        body = claim.payload.encode()
        headers = signed_headers(claim.secret, claim.event_id, int(self._clock()), body)
        started = self._monotonic()
        status: int | None = None
        text: str | None = None
        error: str | None = None
        loop = asyncio.get_running_loop()
        # The outcome is the status within timeout_s (CONTRACT §11); the body is kept for the
        # log only, so it gets what is left of that time and a slow one is cut short.
        deadline = loop.time() + self._settings.timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                response = await self._session.post(
                    claim.url,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    timeout=_OWN_DEADLINE,
                )
            async with response:
                status = response.status
                if not 200 <= status < 300:
                    error = f"http_{status}"
                # The first bytes only: a receiver answering gigabytes costs us 16 KiB. A body
                # cut by the receiver leaves the status standing.
                try:
                    raw = await read_capped(
                        response.content, _READ_BYTES, within_s=max(0.0, deadline - loop.time())
                    )
                except (aiohttp.ClientError, OSError):
                    raw = b""
                text = raw.decode("utf-8", "replace").replace("\x00", "")[:RESPONSE_BODY_CHARS]
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, DestinationNotAllowed):
                return Outcome(None, None, 0, "destination_not_allowed")
            error = "connection_failed"
        except TimeoutError:
            error = "timeout"
        except (aiohttp.ClientError, OSError, ValueError):
            error = "connection_failed"
        duration_ms = round((self._monotonic() - started) * 1000)
        return Outcome(status, text, duration_ms, error)

    async def _record(self, claim: Claim, outcome: Outcome, span: Any) -> None:
        s = self._settings
        retry_in = None
        if not outcome.succeeded:
            retry_in = webhook_retry_delay(
                s.retry_schedule_s, claim.attempt, outcome.status, self._random()
            )
        recorded = await self._store.record(
            claim, claim.url, outcome, retry_in, s.disable_after_failures
        )
        label = outcome_label(outcome.error)
        self.attempts[label] += 1
        sent = outcome.error != "destination_not_allowed"
        if self._telemetry is not None:
            self._telemetry.webhook_attempt(label, outcome.duration_ms / 1000 if sent else None)
        if span is not None:
            span.set_attribute("webhook.id", claim.webhook_id)
            span.set_attribute("webhook.event_id", claim.event_id)
            span.set_attribute("webhook.attempt", claim.attempt)
            span.set_attribute("webhook.outcome", label)
            if outcome.status is not None:
                span.set_attribute("http.response.status_code", outcome.status)
        if self._access_log is not None:
            # No secret, no body, and the URL's host only: its path and query may carry a
            # receiver's token.
            self._access_log.write(
                {
                    "kind": "webhook_attempt",
                    "delivery_id": claim.id,
                    "webhook_id": claim.webhook_id,
                    "tenant_id": claim.tenant_id,
                    "event_id": claim.event_id,
                    "event_type": claim.event_type,
                    "attempt": claim.attempt,
                    "host": urlsplit(claim.url).hostname,
                    "status": outcome.status,
                    "error": outcome.error,
                    "duration_ms": outcome.duration_ms,
                    "retry_in_s": None if retry_in is None else round(retry_in, 3),
                    "recorded": recorded.recorded,
                    "webhook_disabled": recorded.disabled_now,
                }
            )
        if recorded.disabled_now:
            log.warning(
                "webhook %s disabled (%s); %d waiting attempts ended",
                claim.webhook_id,
                outcome.error,
                recorded.ended,
            )
