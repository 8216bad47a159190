"""The dispatcher's loop with a fake store and a real loopback receiver: what it asks the store
for, what it records, and how it lives through a database outage and a stop. (Claims, leases
and the SQL are proven against real Postgres in tests/e2e/test_webhooks_*.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from proxy.background import Job
from proxy.settings import TelemetrySettings, WebhookSettings
from proxy.telemetry import Telemetry
from proxy.webhooks.destinations import Policy
from proxy.webhooks.dispatcher import ATTEMPT_OUTCOMES, Dispatcher, outcome_label
from proxy.webhooks.runner import WebhookJobs, delete_expired
from proxy.webhooks.store import Claim, Outcome, Recorded
from tests.e2e.webhooks import LOOPBACK, Receiver, receiving

WAIT = 5.0  # a bound on the test, never a synchronisation
SETTINGS = WebhookSettings(
    timeout_s=2, lease_s=3, retry_schedule_s=(10, 20), allow_http=True, allow_networks=LOOPBACK
)


@dataclass
class FakeStore:
    """Hands out ``due`` claims; records what the dispatcher records."""

    due: list[Claim] = field(default_factory=list)
    failures: int = 0  # the next claims that raise as a dead database would
    claims: list[tuple[int, dict[str, int], int]] = field(default_factory=list)
    recorded: list[tuple[Claim, Outcome, float | None]] = field(default_factory=list)
    ended: list[Claim] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def claim(self, limit: int, room: Mapping[str, int], per_webhook: int) -> list[Claim]:
        self.claims.append((limit, dict(room), per_webhook))
        self.changed.set()
        if self.failures:
            self.failures -= 1
            raise ConnectionRefusedError("database down")
        taken, self.due = self.due[:limit], self.due[limit:]
        return taken

    async def next_due_in(self, full: list[str]) -> float | None:
        return None

    async def record(
        self, claim: Claim, url: str, outcome: Outcome, retry_in_s: float | None, _n: int
    ) -> Recorded:
        self.recorded.append((claim, outcome, retry_in_s))
        self.changed.set()
        return Recorded(True, False, retry_in_s is not None, 0)

    async def end_claimed(self, claim: Claim) -> None:
        self.ended.append(claim)
        self.changed.set()


def claim(url: str, n: int = 0, **changes: Any) -> Claim:
    base = Claim(
        id=f"00000000-0000-0000-0000-{n:012d}",
        lease_token="11111111-1111-1111-1111-111111111111",
        webhook_id="w1",
        tenant_id="t1",
        event_id=f"e{n}",
        event_type="render.completed",
        payload='{"id": "e"}',
        attempt=1,
        url=url,
        secret="s3cret",
        deliverable=True,
    )
    return replace(base, **changes)


async def until(store: FakeStore, check: Any) -> None:
    async with asyncio.timeout(WAIT):
        while not check():
            store.changed.clear()
            await store.changed.wait()


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving() as r:
        yield r


def dispatcher(store: FakeStore, session: aiohttp.ClientSession, **settings: Any) -> Dispatcher:
    s = replace(SETTINGS, **settings)
    policy = Policy(allow_http=s.allow_http, allow_networks=s.allow_networks)
    return Dispatcher(
        store,  # type: ignore[arg-type]
        session,
        policy,
        s,
        clock=lambda: 1_700_000_000.0,
        random=lambda: 0.5,
        poll_s=30,
    )


@pytest.mark.parametrize(
    ("error", "label"),
    [
        (None, "success"),
        ("http_500", "http_error"),
        ("http_404", "http_error"),
        ("timeout", "timeout"),
        ("connection_failed", "connection_failed"),
        ("destination_not_allowed", "destination_not_allowed"),
    ],
)
def test_outcome_labels_are_the_known_set(error: str | None, label: str) -> None:
    assert outcome_label(error) == label
    assert label in ATTEMPT_OUTCOMES


def test_every_attempt_outcome_is_exposed_at_zero_before_any_attempt() -> None:
    telemetry = Telemetry(TelemetrySettings())
    WebhookJobs("postgresql://127.0.0.1:1/none", SETTINGS, telemetry=telemetry)
    text = telemetry.exposition().decode()
    for outcome in ATTEMPT_OUTCOMES:
        assert f'edge_webhook_attempts_total{{outcome="{outcome}"}} 0.0' in text


async def test_claims_within_the_caps_and_records_each_outcome(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.statuses = [500]
    store = FakeStore(due=[claim(receiver.url(), n) for n in range(3)])
    job = dispatcher(store, session, max_in_flight=10, max_in_flight_per_webhook=4)
    job.start()
    await until(store, lambda: len(store.recorded) == 3)
    await job.stop()
    limit, room, per_webhook = store.claims[0]
    assert (limit, room, per_webhook) == (10, {}, 4)
    outcomes = sorted((str(o.error), retry or 0) for _c, o, retry in store.recorded)
    # The failed one is retried after the schedule's first step (jitter 0.5: exactly it).
    assert outcomes == [("None", 0), ("None", 0), ("http_500", 10.0)]
    assert {r.headers["webhook-timestamp"] for r in receiver.received} == {"1700000000"}


async def test_a_claim_of_a_disabled_webhook_is_ended_not_made(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    store = FakeStore(due=[claim(receiver.url(), deliverable=False)])
    job = dispatcher(store, session)
    job.start()
    await until(store, lambda: len(store.ended) == 1)
    await job.stop()
    assert store.recorded == []
    assert receiver.received == []


async def test_a_database_outage_backs_off_and_the_loop_goes_on(
    session: aiohttp.ClientSession, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    store = FakeStore(due=[claim(receiver.url())], failures=3)
    job = dispatcher(store, session)
    job.start()
    await until(store, lambda: len(store.recorded) == 1)
    await job.stop()
    assert job.db_errors == 3
    assert job.failures == 0  # expected outages are not crashes
    assert "database unavailable" in caplog.text


async def test_stop_waits_for_the_attempt_in_flight(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.delay_s = 0.3
    store = FakeStore(due=[claim(receiver.url())])
    job = dispatcher(store, session)
    job.start()
    async with asyncio.timeout(WAIT):
        await receiver.arrived.wait()
    await job.stop()  # while the receiver is still answering
    assert [o.error for _c, o, _r in store.recorded] == [None]


class EndlessBacklog:
    """Retention's store with always more to delete; asks ``job`` to stop at the third batch."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.batches = 0

    async def delete_expired(self, days: int, batch: int) -> int:
        self.batches += 1
        if self.batches == 3:
            await self.job.stop()
        return batch


async def test_retention_ends_between_batches_once_its_job_is_stopping() -> None:
    job = Job("webhook-retention")
    store = EndlessBacklog(job)
    async with asyncio.timeout(WAIT):  # a bound on the test: without the check it never ends
        await delete_expired(store, 30, job)  # type: ignore[arg-type]
    assert store.batches == 3
