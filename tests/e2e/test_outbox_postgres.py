"""identity.publish_event against real Postgres (CONTRACT §11): idempotent by id, all in the
caller's transaction, fan-out to exactly the matching webhooks, render metering, NOTIFY; and
`python -m proxy events publish`."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, date, datetime

import asyncpg
import orjson
import pytest

from proxy.core.events import matches, valid_type
from proxy.webhooks.store import NOTIFY_CHANNEL
from tests.e2e.support import seeded_database
from tests.e2e.test_cli import assert_one_line_error, run
from tests.e2e.webhooks import add_webhook, attempts, new_tenant, publish
from tests.servers import PostgresServer
from tests.unit.test_events import PATTERNS, TYPES


@pytest.fixture(scope="module")
def dsn(postgres_server: PostgresServer) -> str:
    """One database for the module: every test makes its own tenants and counts only theirs."""

    async def nothing(_conn: asyncpg.Connection) -> None:
        pass

    return seeded_database(postgres_server, "outbox", nothing)


async def events_of(db: asyncpg.Connection, tenant_id: str) -> int:
    n: int = await db.fetchval(
        "SELECT count(*) FROM identity.edge_events WHERE tenant_id = $1", tenant_id
    )
    return n


async def usage(db: asyncpg.Connection, tenant_id: str, day: date) -> dict[str, int]:
    row = await db.fetchrow(
        """SELECT renders_started, renders_completed, renders_failed, render_seconds,
                  render_compute_sec FROM identity.tenant_usage_daily
            WHERE tenant_id = $1 AND usage_date = $2""",
        tenant_id,
        day,
    )
    return dict(row) if row else {}


async def test_a_duplicate_publish_changes_nothing(db: asyncpg.Connection) -> None:
    tenant = await new_tenant(db)
    hook = await add_webhook(db, tenant, "https://hooks.example.com/a", ["render.completed"])
    event_id = str(uuid.uuid4())
    at = datetime(2026, 3, 4, 23, 59, 59, tzinfo=UTC)
    args = (event_id, tenant, "render.completed", '{"render_seconds": 12.4}', at)
    sql = "SELECT identity.publish_event($1, $2, $3, $4::jsonb, $5)"
    assert await db.fetchval(sql, *args) is True
    assert await db.fetchval(sql, *args) is False
    # Even with other content: the id decides.
    assert await db.fetchval(sql, event_id, tenant, "render.failed", "{}", at) is False
    rows = await attempts(db, hook)
    assert len(rows) == 1
    assert await events_of(db, tenant) == 1
    assert await usage(db, tenant, date(2026, 3, 4)) == {
        "renders_started": 0,
        "renders_completed": 1,
        "renders_failed": 0,
        "render_seconds": 12,
        "render_compute_sec": 0,
    }


async def test_the_delivery_row_is_attempt_1_due_now_with_the_body(db: asyncpg.Connection) -> None:
    tenant = await new_tenant(db)
    hook = await add_webhook(db, tenant, "https://hooks.example.com/a")
    at = datetime(2026, 3, 4, 10, 0, 0, 123456, tzinfo=UTC)
    event_id = await publish(db, tenant, "render.completed", {"job": "j1"}, occurred_at=at)
    (row,) = await attempts(db, hook)
    assert row["attempt"] == 1
    assert row["succeeded"] is False
    assert row["request_url"] == "https://hooks.example.com/a"
    assert row["event_type"] == "render.completed"
    assert str(row["event_id"]) == event_id
    assert abs((row["next_retry_at"] - datetime.now(UTC)).total_seconds()) < 5
    assert orjson.loads(row["payload"]) == {
        "id": event_id,
        "type": "render.completed",
        "timestamp": "2026-03-04T10:00:00.123456Z",
        "tenant_id": tenant,
        "data": {"job": "j1"},
    }


async def test_a_rolled_back_publish_publishes_nothing(db: asyncpg.Connection) -> None:
    tenant = await new_tenant(db)
    hook = await add_webhook(db, tenant, "https://hooks.example.com/a")
    event_id = str(uuid.uuid4())
    tr = db.transaction()
    await tr.start()
    await publish(db, tenant, "render.completed", {"render_seconds": 5}, event_id=event_id)
    await tr.rollback()
    assert await attempts(db, hook) == []
    assert await events_of(db, tenant) == 0
    assert await usage(db, tenant, datetime.now(UTC).date()) == {}
    # The id was never published: it publishes now.
    await publish(db, tenant, event_id=event_id)
    assert len(await attempts(db, hook)) == 1


async def test_fan_out_matches_exactly(db: asyncpg.Connection) -> None:
    tenant, other = await new_tenant(db), await new_tenant(db)
    url = "https://hooks.example.com/"
    receives = {
        "exact": await add_webhook(db, tenant, url + "1", ["render.completed"]),
        "star": await add_webhook(db, tenant, url + "2", ["*"]),
        "prefix": await add_webhook(db, tenant, url + "3", ["account.*", "render.*"]),
    }
    misses = {
        "other type": await add_webhook(db, tenant, url + "4", ["render.failed"]),
        "word only": await add_webhook(db, tenant, url + "5", ["render"]),
        "other prefix": await add_webhook(db, tenant, url + "6", ["renders.*"]),
        "inactive": await add_webhook(db, tenant, url + "7", ["*"], is_active=False),
        "disabled": await add_webhook(db, tenant, url + "8", ["*"], disabled=True),
        "other tenant": await add_webhook(db, other, url + "9", ["*"]),
    }
    event_id = await publish(db, tenant, "render.completed")
    for name, hook in receives.items():
        rows = await attempts(db, hook)
        assert [str(r["event_id"]) for r in rows] == [event_id], name
    for name, hook in misses.items():
        assert await attempts(db, hook) == [], name
    # render.* also covers deeper types.
    await publish(db, tenant, "render.job.done")
    assert len(await attempts(db, receives["prefix"])) == 2
    assert len(await attempts(db, receives["exact"])) == 1


async def test_sql_type_rule_is_the_cores(db: asyncpg.Connection) -> None:
    for event_type, valid in TYPES:
        sql = await db.fetchval("SELECT identity.edge_event_type_valid($1)", event_type)
        assert sql is valid is valid_type(event_type), event_type


async def test_sql_matching_is_the_cores(db: asyncpg.Connection) -> None:
    for pattern, event_type, covered in PATTERNS:
        sql = await db.fetchval(
            "SELECT identity.edge_event_type_matches($1, $2)", [pattern], event_type
        )
        assert sql is covered is matches([pattern], event_type), (pattern, event_type)


@pytest.mark.parametrize(
    ("event_type", "data", "message"),
    [
        ("render", {}, "invalid event type"),
        ("Render.Completed", {}, "invalid event type"),
        ("render.completed", [], "data must be a JSON object"),
        ("render.completed", {"render_seconds": "12"}, "render_seconds"),
        ("render.completed", {"compute_seconds": -1}, "compute_seconds"),
    ],
)
async def test_bad_events_are_refused(
    db: asyncpg.Connection, event_type: str, data: object, message: str
) -> None:
    tenant = await new_tenant(db)
    with pytest.raises(asyncpg.InvalidParameterValueError, match=message):
        await db.fetchval(
            "SELECT identity.publish_event($1, $2, $3, $4::jsonb, now())",
            str(uuid.uuid4()),
            tenant,
            event_type,
            orjson.dumps(data).decode(),
        )
    assert await events_of(db, tenant) == 0


async def test_render_metering_per_utc_day(db: asyncpg.Connection) -> None:
    tenant, other = await new_tenant(db), await new_tenant(db)
    hook = await add_webhook(db, tenant, "https://hooks.example.com/a", ["render.completed"])
    # The publisher's session is at UTC+03:30: 23:30 UTC on May 1 is 03:00 on May 2 there.
    await db.execute("SET TimeZone = 'Asia/Tehran'")
    day1 = datetime(2026, 5, 1, 23, 30, tzinfo=UTC)
    day2 = datetime(2026, 5, 2, 0, 30, tzinfo=UTC)
    done = {"render_seconds": 10.5, "compute_seconds": 40}
    first = await publish(db, tenant, "render.completed", done, occurred_at=day1)
    await publish(db, tenant, "render.completed", {"render_seconds": 2}, occurred_at=day1)
    await publish(db, tenant, "render.failed", {"render_seconds": 99}, occurred_at=day1)
    await publish(db, tenant, "render.completed", {}, occurred_at=day2)
    await publish(db, tenant, "render.started", {"render_seconds": 5}, occurred_at=day2)
    await publish(db, other, "render.failed", {}, occurred_at=day2)
    assert await usage(db, tenant, day1.date()) == {
        "renders_started": 0,  # counted by the edge itself (§13), never here
        "renders_completed": 2,
        "renders_failed": 1,
        "render_seconds": 12,  # the floor of 10.5 + 2; a failure's seconds are not metered
        "render_compute_sec": 40,
    }
    assert await usage(db, tenant, day2.date()) == {
        "renders_started": 0,
        "renders_completed": 1,
        "renders_failed": 0,
        "render_seconds": 0,
        "render_compute_sec": 0,
    }
    assert (await usage(db, other, day2.date()))["renders_failed"] == 1
    payload = next(r["payload"] for r in await attempts(db, hook) if str(r["event_id"]) == first)
    assert orjson.loads(payload)["timestamp"] == "2026-05-01T23:30:00.000000Z"
    await db.execute("RESET TimeZone")


async def test_fractional_seconds_are_metered_exactly_over_events(db: asyncpg.Connection) -> None:
    tenant = await new_tenant(db)
    at = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    for _ in range(3):
        data = {"render_seconds": 0.4, "compute_seconds": 0.7}
        await publish(db, tenant, "render.completed", data, occurred_at=at)
    got = await usage(db, tenant, at.date())
    # The BIGINT columns hold the floor of the exact sums (1.2 and 2.1), not a sum of roundings.
    assert (got["render_seconds"], got["render_compute_sec"]) == (1, 2)
    await publish(db, tenant, "render.completed", {"render_seconds": 0.8}, occurred_at=at)
    assert (await usage(db, tenant, at.date()))["render_seconds"] == 2  # 2.0 exactly


async def test_dispatchers_are_notified_at_commit_only(db: asyncpg.Connection, dsn: str) -> None:
    tenant = await new_tenant(db)
    await add_webhook(db, tenant, "https://hooks.example.com/a")
    listener = await asyncpg.connect(dsn)
    got: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(NOTIFY_CHANNEL, lambda *a: got.put_nowait(a[2]))
    try:
        async with db.transaction():
            await publish(db, tenant)
            await publish(db, tenant)
            await asyncio.sleep(0.2)  # a notification sent before commit would be here by now
            assert got.empty()
        await asyncio.wait_for(got.get(), 2)
        await asyncio.sleep(0.2)
        assert got.empty()  # two publishes in one transaction: one wake-up
        # No matching webhook: nothing to wake anyone for.
        await publish(db, await new_tenant(db))
        await asyncio.sleep(0.2)
        assert got.empty()
    finally:
        await listener.close()


async def test_cli_publish(db: asyncpg.Connection, dsn: str) -> None:
    tenant = await new_tenant(db)
    slug = await db.fetchval("SELECT slug::text FROM identity.tenants WHERE id = $1", tenant)
    hook = await add_webhook(db, tenant, "https://hooks.example.com/a")
    env = {"DATABASE_URL": dsn}
    event_id = str(uuid.uuid4())
    args = ("events", "publish", "--tenant", slug, "--type", "render.failed", "--id", event_id)
    first = await asyncio.to_thread(run, *args, "--data", '{"reason": "oom"}', env=env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"id": event_id, "new": True}
    again = await asyncio.to_thread(run, *args, env=env)
    assert json.loads(again.stdout) == {"id": event_id, "new": False}
    (row,) = await attempts(db, hook)
    assert orjson.loads(row["payload"])["data"] == {"reason": "oom"}
    fresh = await asyncio.to_thread(
        run, "events", "publish", "--tenant", slug, "--type", "render.started", env=env
    )
    new_id = json.loads(fresh.stdout)["id"]
    assert str(uuid.UUID(new_id)) == new_id
    data = await db.fetchval("SELECT data::text FROM identity.edge_events WHERE id = $1", new_id)
    assert orjson.loads(data) == {}  # --data defaults to {}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--tenant", "SLUG", "--type", "render"), "--type"),
        (("--tenant", "SLUG", "--type", "render.x", "--data", "[1]"), "--data"),
        (("--tenant", "SLUG", "--type", "render.x", "--data", "{nope"), "--data"),
        (("--tenant", "SLUG", "--type", "render.x", "--id", "42"), "--id"),
        (("--tenant", "nobody", "--type", "render.x"), "--tenant"),
        (
            ("--tenant", "SLUG", "--type", "render.completed", "--data", '{"render_seconds": "x"}'),
            "render_seconds",
        ),
    ],
)
async def test_cli_publish_refusals(
    db: asyncpg.Connection, dsn: str, args: tuple[str, ...], needle: str
) -> None:
    tenant = await new_tenant(db)
    slug = await db.fetchval("SELECT slug::text FROM identity.tenants WHERE id = $1", tenant)
    args = tuple(slug if a == "SLUG" else a for a in args)
    result = await asyncio.to_thread(run, "events", "publish", *args, env={"DATABASE_URL": dsn})
    assert result.returncode == 2
    assert_one_line_error(result, needle)
    assert await events_of(db, tenant) == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("webhooks", "run"), "DATABASE_URL"),
        (("webhooks", "enable", "not-a-uuid"), "WEBHOOK_ID"),
        (("webhooks", "replay", "--event", "42"), "--event"),
        (("webhooks", "replay", "--event", str(uuid.uuid4()), "--webhook", "x"), "--webhook"),
        (("events", "publish", "--tenant", "acme", "--type", "render.completed"), "DATABASE_URL"),
    ],
)
async def test_webhook_commands_refuse_bad_arguments_in_one_line(
    args: tuple[str, ...], needle: str
) -> None:
    result = await asyncio.to_thread(run, *args)
    assert result.returncode == 2
    assert_one_line_error(result, needle)
