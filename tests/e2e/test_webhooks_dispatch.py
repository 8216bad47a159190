"""The webhook dispatcher against real Postgres and real loopback receivers (CONTRACT §11):
delivery within 1 s of a publish, signatures a Standard Webhooks library verifies, retries,
disabling, redirects, refused destinations, per-webhook caps, replay and enable."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import asyncpg
import orjson
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from standardwebhooks.webhooks import Webhook

from proxy.access_log import AccessLog
from proxy.settings import TelemetrySettings
from proxy.stores.postgres import create_pool
from proxy.telemetry import Telemetry
from proxy.webhooks.store import CLAIM, NEXT_DUE, DeliveryStore, Outcome
from tests.e2e.support import within
from tests.e2e.test_cli import assert_one_line_error, run
from tests.e2e.webhooks import (
    SECRET,
    add_webhook,
    attempts,
    dispatching,
    holds,
    new_tenant,
    publish,
    receiving,
)
from tests.unit.test_webhook_destinations import FakeResolver


@pytest.fixture
def dsn(migrated_dsn: str) -> str:
    """A fresh database per test (the e2e ``db`` fixture connects to it): no test sees
    another's due attempts."""
    return migrated_dsn


async def webhook_row(db: asyncpg.Connection, webhook_id: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM identity.tenant_webhooks WHERE id = $1", webhook_id)
    assert row is not None
    return row


async def test_publish_is_delivered_within_1s_signed_for_both_kinds_of_secret(
    db: asyncpg.Connection, migrated_dsn: str
) -> None:
    tenant = await new_tenant(db)
    plain = "a plain secret, not base64 ✓"
    async with receiving() as a, receiving() as b:
        hook_a = await add_webhook(db, tenant, a.url(), secret=SECRET)
        hook_b = await add_webhook(db, tenant, b.url(), secret=plain)
        # Polling far apart: only the NOTIFY of the publish can wake the dispatcher in time.
        async with dispatching(migrated_dsn, poll_s=30) as jobs:
            await within(5, holds(lambda: jobs.listening))
            # The LISTEN connection is one of the jobs whose failures /metrics counts.
            assert {job.name for job in jobs.jobs} == {
                "webhook-dispatcher",
                "flatrender-edge-webhooks",
                "webhook-retention",
                "webhook-figures",
            }
            started = time.monotonic()
            event_id = await publish(db, tenant, "render.completed", {"render_seconds": 3})
            await within(5, holds(lambda: bool(a.received and b.received)))
            assert max(a.received[0].at, b.received[0].at) - started < 1.0

            async def recorded() -> bool:
                rows = [*await attempts(db, hook_a), *await attempts(db, hook_b)]
                return all(r["next_retry_at"] is None for r in rows)

            await within(5, recorded)
    got_a, got_b = a.received[0], b.received[0]
    # As a reseller's server verifies: the Standard Webhooks library, with its own key handling.
    assert Webhook(SECRET).verify(got_a.body, got_a.headers)["id"] == event_id
    assert Webhook(plain.encode()).verify(got_b.body, got_b.headers)["id"] == event_id
    for got in (got_a, got_b):
        assert got.headers["webhook-id"] == event_id
        assert got.headers["Content-Type"] == "application/json"
        assert got.headers["User-Agent"] == "FlatRender-Webhooks/1"
        assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 10
        body = got.json()
        assert body["type"] == "render.completed"
        assert body["tenant_id"] == tenant
        assert body["data"] == {"render_seconds": 3}
    (row,) = await attempts(db, hook_a)
    assert row["succeeded"] is True
    assert row["attempt"] == 1
    assert row["response_status"] == 200
    assert row["response_body"] == "answer 200"
    assert row["delivered_at"] is not None
    assert row["error_message"] is None
    assert row["request_url"] == a.url()
    assert row["payload"].encode() == got_a.body  # the row's payload is the body sent
    hook = await webhook_row(db, hook_a)
    assert hook["last_status_code"] == 200
    assert hook["last_triggered_at"] is not None
    assert hook["consecutive_failures"] == 0


async def test_500_three_times_then_200(db: asyncpg.Connection, migrated_dsn: str) -> None:
    tenant = await new_tenant(db)
    schedule = (0.3, 0.6, 0.9)
    async with receiving(statuses=[500, 500, 500]) as r:
        hook = await add_webhook(db, tenant, r.url())
        async with dispatching(migrated_dsn, retry_schedule_s=schedule):
            event_id = await publish(db, tenant)

            async def succeeded() -> bool:
                return any(row["succeeded"] for row in await attempts(db, hook))

            await within(10, succeeded)
    rows = await attempts(db, hook)
    assert [row["attempt"] for row in rows] == [1, 2, 3, 4]
    assert [row["error_message"] for row in rows] == ["http_500"] * 3 + [None]
    assert [row["response_status"] for row in rows] == [500, 500, 500, 200]
    assert [row["succeeded"] for row in rows] == [False, False, False, True]
    assert all(row["next_retry_at"] is None for row in rows)
    assert r.ids() == [event_id] * 4  # the same webhook-id on every attempt
    # Each retry waited its turn of the schedule (±10%) after the failed attempt ended: a retry
    # row is inserted by the statement that records the attempt before it (its created_at).
    waits = [
        got.wall - row["created_at"].timestamp()
        for got, row in zip(r.received[1:], rows[1:], strict=True)
    ]
    for waited, delay in zip(waits, schedule, strict=True):
        assert delay * 0.9 - 0.02 <= waited <= delay * 1.1 + 0.25, (waits, schedule)
    hook_row = await webhook_row(db, hook)
    assert hook_row["consecutive_failures"] == 0
    assert hook_row["last_status_code"] == 200


async def test_the_last_attempt_is_the_last(db: asyncpg.Connection, migrated_dsn: str) -> None:
    tenant = await new_tenant(db)
    async with receiving(default=503) as r:
        hook = await add_webhook(db, tenant, r.url())
        async with dispatching(migrated_dsn, retry_schedule_s=(0.1, 0.1)):
            await publish(db, tenant)

            async def three_made() -> bool:
                rows = await attempts(db, hook)
                return len(rows) == 3 and all(row["next_retry_at"] is None for row in rows)

            await within(10, three_made)
            await asyncio.sleep(1.0)  # a fourth would have been due 0.1 s on, polled within 1 s
    assert len(r.received) == 3
    assert len(await attempts(db, hook)) == 3
    assert (await webhook_row(db, hook))["consecutive_failures"] == 3


async def test_410_disables_and_ends_waiting_attempts_then_enable(
    db: asyncpg.Connection, migrated_dsn: str
) -> None:
    tenant = await new_tenant(db)
    async with receiving(statuses=[410]) as r:
        hook = await add_webhook(db, tenant, r.url())
        for _ in range(3):
            await publish(db, tenant)
        # One at a time: the first answer (410) comes while the two others still wait.
        async with dispatching(migrated_dsn, max_in_flight_per_webhook=1):

            async def settled() -> bool:
                rows = await attempts(db, hook)
                return all(row["next_retry_at"] is None for row in rows)

            await within(5, settled)
            rows = await attempts(db, hook)
            assert len(r.received) == 1
            assert sorted(str(row["error_message"]) for row in rows) == [
                "http_410",
                "webhook_disabled",
                "webhook_disabled",
            ]
            assert len(rows) == 3  # no retry of a 410
            hook_row = await webhook_row(db, hook)
            assert hook_row["disabled_at"] is not None
            assert hook_row["last_status_code"] == 410
            assert hook_row["consecutive_failures"] == 1  # ended attempts are not failures
            await publish(db, tenant)
            assert len(await attempts(db, hook)) == 3  # a disabled webhook gets nothing new

            env = {"DATABASE_URL": migrated_dsn}
            result = await asyncio.to_thread(run, "webhooks", "enable", hook, env=env)
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout) == {"id": hook, "enabled": True}
            hook_row = await webhook_row(db, hook)
            assert (hook_row["disabled_at"], hook_row["consecutive_failures"]) == (None, 0)
            event_id = await publish(db, tenant)
            await within(5, holds(lambda: event_id in r.ids()))
    unknown = await asyncio.to_thread(
        run, "webhooks", "enable", str(uuid.uuid4()), env={"DATABASE_URL": migrated_dsn}
    )
    assert unknown.returncode == 2
    assert_one_line_error(unknown, "WEBHOOK_ID")


async def test_disabled_after_n_consecutive_failures(
    db: asyncpg.Connection, migrated_dsn: str
) -> None:
    tenant = await new_tenant(db)
    async with receiving(default=500) as r:
        hook = await add_webhook(db, tenant, r.url())
        overrides = {"retry_schedule_s": (0.1,) * 5, "disable_after_failures": 2}
        async with dispatching(migrated_dsn, **overrides):
            await publish(db, tenant)

            async def disabled() -> bool:
                return (await webhook_row(db, hook))["disabled_at"] is not None

            await within(5, disabled)
            await asyncio.sleep(1.0)  # a third would have been due 0.1 s on, polled within 1 s
    rows = await attempts(db, hook)
    assert [row["attempt"] for row in rows] == [1, 2]
    assert len(r.received) == 2
    assert all(row["next_retry_at"] is None for row in rows)


async def test_the_response_body_kept_is_its_first_4096_characters(
    db: asyncpg.Connection, dsn: str
) -> None:
    tenant = await new_tenant(db)
    # Multi-byte characters, a NUL (Postgres text cannot hold one) and far more than is kept.
    async with receiving(text="é\x00" + "ü" * 100_000) as r:
        hook = await add_webhook(db, tenant, r.url())
        async with dispatching(dsn):
            await publish(db, tenant)

            async def made() -> bool:
                return any(row["succeeded"] for row in await attempts(db, hook))

            await within(5, made)
    (row,) = await attempts(db, hook)
    assert row["response_body"] == "é" + "ü" * 4095


async def test_a_2xx_whose_body_stalls_is_a_success_with_what_arrived(
    db: asyncpg.Connection, dsn: str
) -> None:
    tenant = await new_tenant(db)
    async with receiving(stall_body=True) as r:
        hook = await add_webhook(db, tenant, r.url())
        async with dispatching(dsn, timeout_s=2.0, lease_s=7.0):
            await publish(db, tenant)

            async def made() -> bool:
                return any(row["next_retry_at"] is None for row in await attempts(db, hook))

            await within(8, made)
    (row,) = await attempts(db, hook)
    assert row["succeeded"] is True and row["error_message"] is None
    assert row["response_status"] == 200
    assert row["response_body"] == "first bytes"
    assert 1900 <= row["duration_ms"] < 6000  # the body was waited for until timeout_s


async def test_a_redirect_is_a_failure_and_is_not_followed(
    db: asyncpg.Connection, migrated_dsn: str
) -> None:
    tenant = await new_tenant(db)
    async with receiving(statuses=[302]) as r:
        hook = await add_webhook(db, tenant, r.url())
        async with dispatching(migrated_dsn, retry_schedule_s=(60,)):
            await publish(db, tenant)

            async def made() -> bool:
                return any(row["error_message"] for row in await attempts(db, hook))

            await within(5, made)
            await asyncio.sleep(0.3)  # a followed redirect would have arrived by now
    first, retry = await attempts(db, hook)
    assert (first["response_status"], first["error_message"]) == (302, "http_302")
    assert first["succeeded"] is False
    assert retry["attempt"] == 2 and retry["next_retry_at"] is not None  # due in a minute
    assert [got.path for got in r.received] == ["/hook"]


@pytest.mark.parametrize(
    ("overrides", "url"),
    [
        ({"allow_networks": ()}, "http://127.0.0.1:{port}/hook"),  # a loopback literal
        ({"allow_networks": ()}, "http://hooks.reseller.test:{port}/hook"),  # resolves to it
        # Fullwidth digits: aiohttp's URL maps them to 127.0.0.1 and connects there directly.
        ({"allow_networks": ()}, "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11:{port}/hook"),
        ({"allow_http": False}, "http://127.0.0.1:{port}/hook"),  # https only
    ],
)
async def test_a_refused_destination_gets_nothing(
    db: asyncpg.Connection, migrated_dsn: str, overrides: dict[str, object], url: str
) -> None:
    tenant = await new_tenant(db)
    resolver = FakeResolver({"hooks.reseller.test": ["127.0.0.1"]})
    async with receiving() as r:
        hook = await add_webhook(db, tenant, url.format(port=r.port))
        async with dispatching(
            migrated_dsn, retry_schedule_s=(60,), resolver=resolver, **overrides
        ):
            await publish(db, tenant)

            async def made() -> bool:
                return any(row["error_message"] for row in await attempts(db, hook))

            await within(5, made)
    first = (await attempts(db, hook))[0]
    assert first["error_message"] == "destination_not_allowed"
    assert first["duration_ms"] == 0
    assert first["response_status"] is None
    assert r.received == []
    hook_row = await webhook_row(db, hook)
    assert hook_row["last_status_code"] is None  # no answer
    assert hook_row["last_triggered_at"] is not None
    assert hook_row["consecutive_failures"] == 1


async def test_a_name_is_connected_to_at_the_address_checked(
    db: asyncpg.Connection, migrated_dsn: str
) -> None:
    tenant = await new_tenant(db)
    resolver = FakeResolver({"hooks.reseller.test": ["127.0.0.1"]})
    async with receiving() as r:
        hook = await add_webhook(db, tenant, f"http://hooks.reseller.test:{r.port}/hook")
        async with dispatching(migrated_dsn, resolver=resolver, max_in_flight_per_webhook=1):
            first = await publish(db, tenant)
            await within(5, holds(lambda: len(r.received) == 1))
            second = await publish(db, tenant)
            await within(5, holds(lambda: len(r.received) == 2))
    assert r.ids() == [first, second]
    assert r.received[0].headers["Host"] == f"hooks.reseller.test:{r.port}"
    assert resolver.lookups == ["hooks.reseller.test"]  # then the pooled connection
    assert (await attempts(db, hook))[0]["request_url"].startswith("http://hooks.reseller.test")
    # The receiver set a cookie on its first answer; no cookie jar sends it back.
    assert "Cookie" not in r.received[1].headers


async def test_a_black_hole_delays_only_itself(db: asyncpg.Connection, migrated_dsn: str) -> None:
    slow_tenant, tenant = await new_tenant(db), await new_tenant(db)
    # The dispatcher outlives the receivers (contexts exit last to first): closing the black
    # hole ends its attempts, so the dispatcher's stop does not wait out their timeout.
    async with (
        dispatching(migrated_dsn, timeout_s=5, lease_s=6, poll_s=30) as jobs,
        receiving(hang=True) as hole,
        receiving() as r,
    ):
        await add_webhook(db, slow_tenant, hole.url())
        await add_webhook(db, tenant, r.url())
        async with db.transaction():
            for _ in range(20):
                await publish(db, slow_tenant)
        # The black hole holds its four slots (max_in_flight_per_webhook) and no more.
        await within(5, holds(lambda: len(hole.received) == 4))
        await within(5, holds(lambda: jobs.listening))
        started = time.monotonic()
        event_id = await publish(db, tenant)
        await within(5, holds(lambda: bool(r.received)))
        assert r.received[0].at - started < 1.0
        assert r.ids() == [event_id]
        assert len(hole.received) == 4


async def test_max_in_flight_caps_the_process(db: asyncpg.Connection, dsn: str) -> None:
    tenant = await new_tenant(db)
    async with (
        dispatching(dsn, timeout_s=5, lease_s=6, max_in_flight=3),
        receiving(hang=True) as hole,
    ):
        for path in ("/a", "/b"):
            await add_webhook(db, tenant, hole.url(path))
        async with db.transaction():
            for _ in range(5):
                await publish(db, tenant)
        await within(5, holds(lambda: len(hole.received) == 3))
        await asyncio.sleep(1.0)  # a fourth would have arrived by now (claims poll every 1 s)
        assert len(hole.received) == 3  # 10 due, 4 per webhook allowed, 3 in all


async def test_replay(db: asyncpg.Connection, migrated_dsn: str) -> None:
    tenant = await new_tenant(db)
    env = {"DATABASE_URL": migrated_dsn}
    async with receiving() as a, receiving() as b:
        hook_a = await add_webhook(db, tenant, a.url(), ["render.*"])
        await add_webhook(db, tenant, b.url(), ["render.failed"])
        async with dispatching(migrated_dsn):
            event_id = await publish(db, tenant, "render.completed")
            await within(5, holds(lambda: len(a.received) == 1))
            # To every webhook that matches it now: one more, added since, matches too.
            hook_c = await add_webhook(db, tenant, b.url("/c"), ["*"])
            result = await asyncio.to_thread(
                run, "webhooks", "replay", "--event", event_id, env=env
            )
            assert result.returncode == 0, result.stderr
            made = json.loads(result.stdout)
            assert made["event"] == event_id
            assert sorted(d["webhook_id"] for d in made["deliveries"]) == sorted([hook_a, hook_c])
            await within(5, holds(lambda: len(a.received) == 2 and len(b.received) == 1))
            # To one webhook.
            args = ("webhooks", "replay", "--event", event_id, "--webhook", hook_a)
            result = await asyncio.to_thread(run, *args, env=env)
            assert len(json.loads(result.stdout)["deliveries"]) == 1
            await within(5, holds(lambda: len(a.received) == 3))
    assert a.ids() == [event_id] * 3  # receivers deduplicate by the same webhook-id
    assert [got.path for got in b.received] == ["/c"]
    assert [row["attempt"] for row in await attempts(db, hook_a)] == [1, 1, 1]
    unknown = await asyncio.to_thread(
        run, "webhooks", "replay", "--event", str(uuid.uuid4()), env=env
    )
    assert unknown.returncode == 2
    assert_one_line_error(unknown, "--event")
    other = await add_webhook(db, await new_tenant(db), a.url())
    args = ("webhooks", "replay", "--event", event_id, "--webhook", other)
    assert_one_line_error(await asyncio.to_thread(run, *args, env=env), "--webhook")


async def test_metrics_spans_and_one_log_line_per_attempt(
    db: asyncpg.Connection, migrated_dsn: str
) -> None:
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(TelemetrySettings(), exporter)
    stream = io.BytesIO()
    tenant = await new_tenant(db)
    await add_webhook(db, await new_tenant(db), "https://disabled.example/", disabled=True)
    async with receiving(statuses=[500]) as r:
        hook = await add_webhook(db, tenant, r.url())
        jobs_args = {"telemetry": telemetry, "access_log": AccessLog(stream, flush_interval_s=0.05)}
        async with dispatching(migrated_dsn, retry_schedule_s=(0.1,), **jobs_args):
            event_id = await publish(db, tenant, data={"customer_email": "x@example.com"})

            # The figures, not the row: the row commits before the dispatcher counts it. The
            # deployment-wide gauges come from the figures job's own query, which races the
            # attempts: wait for it too.
            success = 'edge_webhook_attempts_total{outcome="success"} 1.0'
            figured = "edge_webhooks_disabled 1.0"
            await within(
                5,
                holds(
                    lambda: {success, figured} <= set(telemetry.exposition().decode().split("\n"))
                ),
            )
            text = telemetry.exposition().decode()
    assert 'edge_webhook_attempts_total{outcome="success"} 1.0' in text
    assert 'edge_webhook_attempts_total{outcome="http_error"} 1.0' in text
    assert "edge_webhook_attempt_duration_seconds_count 2.0" in text
    assert "edge_webhooks_disabled 1.0" in text
    assert "edge_webhook_attempts_due" in text
    spans = [s for s in exporter.get_finished_spans() if s.name == "webhook attempt"]
    assert [s.attributes["webhook.outcome"] for s in spans if s.attributes] == [
        "http_error",
        "success",
    ]
    assert all(s.attributes and s.attributes["webhook.event_id"] == event_id for s in spans)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["kind"], x["attempt"], x["status"], x["error"]) for x in lines] == [
        ("webhook_attempt", 1, 500, "http_500"),
        ("webhook_attempt", 2, 200, None),
    ]
    assert lines[0]["event_id"] == event_id and lines[0]["webhook_id"] == hook
    assert lines[0]["time"].endswith("+00:00")  # the access log's own time stamp
    raw = stream.getvalue()
    secret_key = base64.b64decode(SECRET.removeprefix("whsec_"))
    for secret in (SECRET.encode(), secret_key, b"customer_email", b"answer 500", b"/hook"):
        assert secret not in raw  # no secret, no body (sent or received), no URL path


async def test_two_claims_never_share_a_row_and_respect_caps(
    db: asyncpg.Connection, migrated_dsn: str
) -> None:
    tenant = await new_tenant(db)
    a = await add_webhook(db, tenant, "https://a.example/")
    b = await add_webhook(db, tenant, "https://b.example/")
    for _ in range(30):
        await publish(db, tenant)
    pool = await create_pool(migrated_dsn, timeout_s=5, max_size=4)
    try:
        store = DeliveryStore(pool, lease_s=30)
        capped = await store.claim(100, {a: 1}, per_webhook=3)
        assert sorted(c.webhook_id for c in capped) == sorted([a, b, b, b])
        one, two = await asyncio.gather(
            store.claim(20, {}, per_webhook=100), store.claim(20, {}, per_webhook=100)
        )
        ids = [c.id for c in (*capped, *one, *two)]
        assert len(ids) == len(set(ids)) == 44
        # The lease is a fencing token: once another claim holds the row, an old lease
        # records nothing.
        stale = replace(one[0], lease_token=str(uuid.uuid4()))
        done = await store.record(stale, stale.url, Outcome(200, "", 1, None), None, 20)
        assert done.recorded is False
        done = await store.record(one[0], one[0].url, Outcome(200, "", 1, None), None, 20)
        assert done.recorded is True
    finally:
        await pool.close()


@asynccontextmanager
async def store_of(dsn: str) -> AsyncIterator[DeliveryStore]:
    pool = await create_pool(dsn, timeout_s=5, max_size=4)
    try:
        yield DeliveryStore(pool, lease_s=30)
    finally:
        await pool.close()


async def test_a_claim_skips_a_locked_row_without_waiting(
    db: asyncpg.Connection, migrated_dsn: str
) -> None:
    tenant = await new_tenant(db)
    hook = await add_webhook(db, tenant, "https://a.example/")
    for _ in range(5):
        await publish(db, tenant)
    rows = await attempts(db, hook)
    locked = str(rows[0]["id"])
    holder = await asyncpg.connect(migrated_dsn)
    try:
        async with store_of(migrated_dsn) as store, holder.transaction():
            # Another dispatcher's claim, mid-transaction, holds this row.
            await holder.execute(
                "SELECT 1 FROM identity.tenant_webhook_deliveries WHERE id = $1 FOR UPDATE",
                locked,
            )
            got = await asyncio.wait_for(store.claim(100, {}, per_webhook=100), 5)
    finally:
        await holder.close()
    assert sorted(c.id for c in got) == sorted(str(r["id"]) for r in rows[1:])


async def test_disabling_does_not_wait_on_an_attempt_still_recording(
    db: asyncpg.Connection, migrated_dsn: str
) -> None:
    tenant = await new_tenant(db)
    await add_webhook(db, tenant, "https://a.example/")
    await publish(db, tenant)
    await publish(db, tenant)
    holder = await asyncpg.connect(migrated_dsn)
    try:
        async with store_of(migrated_dsn) as store:
            first, second = await store.claim(10, {}, per_webhook=10)
            # The second attempt outlived its lease and its dispatcher is recording it now:
            # it holds the row's lock (and would next wait for the webhook's).
            await db.execute(
                """UPDATE identity.tenant_webhook_deliveries
                      SET next_retry_at = now() - interval '1 second' WHERE id = $1""",
                second.id,
            )
            async with holder.transaction():
                await holder.execute(
                    "SELECT 1 FROM identity.tenant_webhook_deliveries WHERE id = $1 FOR UPDATE",
                    second.id,
                )
                gone = Outcome(410, "", 1, "http_410")
                done = await asyncio.wait_for(store.record(first, first.url, gone, None, 20), 5)
            assert done.disabled_now and done.ended == 0
            # Left to whoever reclaims it: ended there, not made.
            (again,) = await store.claim(10, {}, per_webhook=10)
            assert again.id == second.id and not again.deliverable
            await store.end_claimed(again)
    finally:
        await holder.close()
    row = await db.fetchrow(
        "SELECT * FROM identity.tenant_webhook_deliveries WHERE id = $1", second.id
    )
    assert row["next_retry_at"] is None and row["error_message"] == "webhook_disabled"


def plan_nodes(plan: Any) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from plan_nodes(child)


async def test_a_capped_webhooks_backlog_is_passed_over_on_the_index(
    db: asyncpg.Connection, migrated_dsn: str
) -> None:
    tenant = await new_tenant(db)
    capped = await add_webhook(db, tenant, "https://a.example/")
    other = await add_webhook(db, tenant, "https://b.example/")
    # 20,000 due attempts of a webhook at its cap here, all due before the other's one.
    await db.execute(
        """INSERT INTO identity.tenant_webhook_deliveries (webhook_id, tenant_id, event_type,
           event_id, payload, request_url, next_retry_at)
           SELECT $1, $2, 'render.completed', gen_random_uuid(), '{}', 'https://a.example/',
                  now() - make_interval(secs => i) FROM generate_series(1, 20000) AS i""",
        capped,
        tenant,
    )
    mine = await publish(db, tenant)
    await db.execute(
        "DELETE FROM identity.tenant_webhook_deliveries WHERE event_id = $1 AND webhook_id = $2",
        mine,
        capped,
    )
    await db.execute("VACUUM ANALYZE identity.tenant_webhook_deliveries")
    for sql in (NEXT_DUE, CLAIM):
        args = ([capped],) if sql is NEXT_DUE else (10, [capped], [], [], 4, 30)
        explaining = db.transaction()
        await explaining.start()
        try:
            (explained,) = orjson.loads(
                await db.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *args)
            )
        finally:
            await explaining.rollback()  # the claim's lease, taken to measure it
        read = sum(
            node["Actual Rows"] * node["Actual Loops"] + node.get("Rows Removed by Filter", 0)
            for node in plan_nodes(explained["Plan"])
            if node.get("Relation Name") == "tenant_webhook_deliveries"
        )
        # A handful of index entries, not the capped webhook's 20,000 rows.
        assert read < 100, (sql, read)
    async with store_of(migrated_dsn) as store:
        claimed = await store.claim(10, {capped: 0}, per_webhook=4)
        assert [(c.webhook_id, c.event_id) for c in claimed] == [(other, mine)]
        # The next due time (the other's lease) leaves the capped webhook's backlog out.
        due_in = await store.next_due_in([capped])
        assert due_in is not None and due_in > 20


async def test_retention_deletes_old_events_and_finished_attempts(
    db: asyncpg.Connection, migrated_dsn: str
) -> None:
    tenant = await new_tenant(db)
    hook = await add_webhook(db, tenant, "https://a.example/", disabled=True)
    old_event = await publish(db, tenant)
    new_event = await publish(db, tenant)
    await db.execute(
        "UPDATE identity.edge_events SET published_at = now() - interval '31 days' WHERE id = $1",
        old_event,
    )
    payload = orjson.dumps({"id": old_event}).decode()
    insert = """INSERT INTO identity.tenant_webhook_deliveries (webhook_id, tenant_id, event_type,
        event_id, payload, request_url, next_retry_at, created_at)
        SELECT $1, $2, 'render.completed', $3, $4::jsonb, 'https://a.example/', $5,
               now() - make_interval(days => $6) FROM generate_series(1, $7)"""
    far = await db.fetchval("SELECT now() + interval '1 day'")
    await db.execute(insert, hook, tenant, old_event, payload, None, 31, 1200)  # finished, old
    await db.execute(insert, hook, tenant, old_event, payload, far, 31, 1)  # waiting, old
    await db.execute(insert, hook, tenant, old_event, payload, None, 29, 1)  # finished, recent
    async with dispatching(migrated_dsn):

        async def deleted() -> bool:
            n = await db.fetchval(
                "SELECT count(*) FROM identity.tenant_webhook_deliveries WHERE webhook_id = $1",
                hook,
            )
            return int(n) == 2

        await within(10, deleted)
    left = await db.fetch("SELECT id::text FROM identity.edge_events WHERE tenant_id = $1", tenant)
    assert [r["id"] for r in left] == [new_event]
