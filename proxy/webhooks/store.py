"""Postgres side of webhook delivery: claim due attempts, record outcomes, retention, figures,
and the operator commands (publish, enable, replay). SQL as named constants beside its use.

Claiming (pgqueuer, Oban and solid_queue do the same): due rows are locked with
``FOR UPDATE SKIP LOCKED`` (so two dispatchers never take the same row) and leased, by moving
``next_retry_at`` to the end of the lease and writing a fresh ``lease_token``. A dispatcher
that dies loses nothing: at the end of the lease the row is due again for anyone. Recording
checks the token (a fencing token), so a dispatcher that outlived its lease cannot overwrite
the attempt another one has made since.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import asyncpg

NOTIFY_CHANNEL = "flatrender_edge_deliveries"

# Both the claim and the next-due lookup walk the partial index on (webhook_id, next_retry_at,
# id) with row comparisons, one index probe a step (a loose index scan: PostgreSQL wiki,
# "Loose indexscan"), taking a webhook's earliest rows while it has room and jumping past the
# rest of it otherwise: the cost follows the number of webhooks waiting and the rows taken,
# never the length of one webhook's backlog (a black-holed receiver's, at its cap here).
# Every ORDER BY is that index's order, so no other index can serve it. A webhook's room is 0
# when it is at its cap in this process ($2), its own figure when busy ($3/$4), else $5.
CLAIM = """
WITH RECURSIVE room(webhook_id, n) AS (
    SELECT webhook_id, 0 FROM unnest($2::uuid[]) AS full_(webhook_id)
    UNION ALL
    SELECT * FROM unnest($3::uuid[], $4::int[])
), walk(webhook_id, next_retry_at, id, n, room, take) AS (
    SELECT f.webhook_id, f.next_retry_at, f.id, 1, r.room,
           r.room >= 1 AND f.next_retry_at <= now()
      FROM (SELECT d.webhook_id, d.next_retry_at, d.id
              FROM identity.tenant_webhook_deliveries d
             WHERE d.succeeded = false AND d.next_retry_at IS NOT NULL
             ORDER BY d.webhook_id, d.next_retry_at, d.id LIMIT 1) f
     CROSS JOIN LATERAL (
         SELECT coalesce((SELECT min(n) FROM room WHERE room.webhook_id = f.webhook_id), $5)
             AS room) r
    UNION ALL
    SELECT x.webhook_id, x.next_retry_at, x.id, x.n, x.room, x.n <= x.room
           AND x.next_retry_at <= now()
      FROM walk w
     CROSS JOIN LATERAL (
         SELECT d.webhook_id, d.next_retry_at, d.id
           FROM identity.tenant_webhook_deliveries d
          WHERE d.succeeded = false AND d.next_retry_at IS NOT NULL
            AND (d.webhook_id, d.next_retry_at, d.id) > (
                w.webhook_id,
                CASE WHEN w.take AND w.n < w.room THEN w.next_retry_at
                     ELSE 'infinity'::timestamptz END,
                w.id)
          ORDER BY d.webhook_id, d.next_retry_at, d.id LIMIT 1) nx
     CROSS JOIN LATERAL (
         SELECT nx.webhook_id, nx.next_retry_at, nx.id,
                CASE WHEN nx.webhook_id = w.webhook_id THEN w.n + 1 ELSE 1 END AS n,
                CASE WHEN nx.webhook_id = w.webhook_id THEN w.room
                     ELSE coalesce((SELECT min(n) FROM room WHERE room.webhook_id = nx.webhook_id),
                                   $5) END AS room) x
), scan AS (
    SELECT id, next_retry_at FROM walk WHERE take
), pick AS (
    SELECT d.id
      FROM identity.tenant_webhook_deliveries d
     WHERE d.id IN (SELECT id FROM scan ORDER BY next_retry_at LIMIT $1)
       AND d.succeeded = false AND d.next_retry_at IS NOT NULL AND d.next_retry_at <= now()
       FOR UPDATE OF d SKIP LOCKED
)
UPDATE identity.tenant_webhook_deliveries d
   SET next_retry_at = clock_timestamp() + make_interval(secs => $6),
       lease_token = gen_random_uuid()
  FROM pick, identity.tenant_webhooks w
 WHERE d.id = pick.id AND w.id = d.webhook_id
RETURNING d.id::text AS id, d.lease_token::text AS lease_token, d.webhook_id::text AS webhook_id,
          d.tenant_id::text AS tenant_id, d.event_id::text AS event_id, d.event_type,
          d.payload::text AS payload, d.attempt, w.url, w.secret,
          (w.is_active AND w.disabled_at IS NULL) AS deliverable
"""

# One statement, so the attempt, the webhook's state, the next attempt and the ending of the
# waiting ones of a webhook just disabled commit together. statement_timestamp() is the time
# the attempt ended. Rows still leased (even past the lease) are left to their own attempt's
# RECORD, or to END_CLAIMED when reclaimed: ending them here would wait on that attempt's row
# lock while it waits on the webhook's, a deadlock. A failure disables only once (the first
# time the threshold is reached).
RECORD = """
WITH done AS (
    UPDATE identity.tenant_webhook_deliveries
       SET next_retry_at = NULL, lease_token = NULL, request_url = $3, response_status = $4,
           response_body = $5, duration_ms = $6, succeeded = $7,
           delivered_at = CASE WHEN $7 THEN statement_timestamp() END, error_message = $8
     WHERE id = $1 AND lease_token = $2
    RETURNING webhook_id, tenant_id, event_type, event_id, payload, attempt
), hook AS (
    UPDATE identity.tenant_webhooks w
       SET last_triggered_at = statement_timestamp(), last_status_code = $4,
           consecutive_failures = CASE WHEN $7 THEN 0 ELSE w.consecutive_failures + 1 END,
           disabled_at = CASE WHEN w.disabled_at IS NULL AND NOT $7
                                   AND ($4 IS NOT DISTINCT FROM 410
                                        OR w.consecutive_failures + 1 >= $10)
                              THEN statement_timestamp() ELSE w.disabled_at END
      FROM done
     WHERE w.id = done.webhook_id
    RETURNING w.id, w.url, w.is_active, w.disabled_at
), retry AS (
    INSERT INTO identity.tenant_webhook_deliveries
        (webhook_id, tenant_id, event_type, event_id, payload, request_url, attempt,
         next_retry_at)
    SELECT done.webhook_id, done.tenant_id, done.event_type, done.event_id, done.payload,
           hook.url, done.attempt + 1, statement_timestamp() + make_interval(secs => $9)
      FROM done JOIN hook ON hook.id = done.webhook_id
     WHERE $9::float8 IS NOT NULL AND hook.is_active AND hook.disabled_at IS NULL
    RETURNING 1
), ended AS (
    UPDATE identity.tenant_webhook_deliveries d
       SET next_retry_at = NULL, lease_token = NULL, error_message = 'webhook_disabled'
      FROM hook
     WHERE d.webhook_id = hook.id AND hook.disabled_at IS NOT NULL AND d.id <> $1
       AND d.succeeded = false AND d.next_retry_at IS NOT NULL AND d.lease_token IS NULL
    RETURNING 1
)
SELECT (SELECT count(*) FROM done) AS recorded,
       coalesce((SELECT disabled_at = statement_timestamp() FROM hook), false) AS disabled_now,
       (SELECT count(*) FROM retry) AS retried,
       (SELECT count(*) FROM ended) AS ended
"""

# A claimed attempt of a webhook disabled or deactivated since it was queued: ended, not made,
# and not counted as a failure (CONTRACT §11).
END_CLAIMED = """
UPDATE identity.tenant_webhook_deliveries
   SET next_retry_at = NULL, lease_token = NULL, error_message = 'webhook_disabled'
 WHERE id = $1 AND lease_token = $2
"""

# Seconds until the earliest waiting row is due (or its lease ends): when to look again. The
# webhooks at their cap here are left out (a freed slot wakes the dispatcher anyway).
NEXT_DUE = """
WITH RECURSIVE firsts(webhook_id, next_retry_at) AS (
    (SELECT webhook_id, next_retry_at FROM identity.tenant_webhook_deliveries
      WHERE succeeded = false AND next_retry_at IS NOT NULL
      ORDER BY webhook_id, next_retry_at, id LIMIT 1)
    UNION ALL
    SELECT nx.webhook_id, nx.next_retry_at
      FROM firsts f
     CROSS JOIN LATERAL (
         SELECT d.webhook_id, d.next_retry_at FROM identity.tenant_webhook_deliveries d
          WHERE d.succeeded = false AND d.next_retry_at IS NOT NULL
            AND d.webhook_id > f.webhook_id
          ORDER BY d.webhook_id, d.next_retry_at, d.id LIMIT 1) nx
)
SELECT extract(epoch FROM min(next_retry_at) - clock_timestamp())::float8
  FROM firsts WHERE NOT (webhook_id = ANY($1::uuid[]))
"""

FIGURES = """
SELECT (SELECT count(*) FROM identity.tenant_webhook_deliveries
         WHERE succeeded = false AND next_retry_at IS NOT NULL AND next_retry_at <= now()) AS due,
       (SELECT count(*) FROM identity.tenant_webhooks WHERE disabled_at IS NOT NULL) AS disabled
"""

# Small batches (SKIP LOCKED: two dispatchers share the work instead of waiting on each other),
# so retention never holds long locks or writes one huge transaction.
DELETE_EVENTS = """
DELETE FROM identity.edge_events WHERE id IN (
    SELECT id FROM identity.edge_events
     WHERE published_at < now() - make_interval(days => $1)
     LIMIT $2 FOR UPDATE SKIP LOCKED)
"""
DELETE_ATTEMPTS = """
DELETE FROM identity.tenant_webhook_deliveries WHERE id IN (
    SELECT id FROM identity.tenant_webhook_deliveries
     WHERE next_retry_at IS NULL AND created_at < now() - make_interval(days => $1)
     LIMIT $2 FOR UPDATE SKIP LOCKED)
"""

TENANT_BY_SLUG = (
    "SELECT id::text FROM identity.tenants WHERE slug = $1::citext AND deleted_at IS NULL"
)
PUBLISH = "SELECT identity.publish_event($1::uuid, $2::uuid, $3, $4::jsonb, $5)"
ENABLE = """
UPDATE identity.tenant_webhooks SET disabled_at = NULL, consecutive_failures = 0
 WHERE id = $1::uuid RETURNING id::text
"""
EVENT = "SELECT tenant_id::text AS tenant_id FROM identity.edge_events WHERE id = $1::uuid"
WEBHOOK = """
SELECT tenant_id::text AS tenant_id, is_active, disabled_at
  FROM identity.tenant_webhooks WHERE id = $1::uuid
"""
REPLAY = """
INSERT INTO identity.tenant_webhook_deliveries
    (webhook_id, tenant_id, event_type, event_id, payload, request_url, attempt, next_retry_at)
SELECT w.id, e.tenant_id, e.type, e.id, identity.edge_event_payload(e), w.url, 1, now()
  FROM identity.edge_events e
  JOIN identity.tenant_webhooks w ON w.tenant_id = e.tenant_id
 WHERE e.id = $1::uuid
   AND CASE WHEN $2::uuid IS NULL
            THEN w.is_active AND w.disabled_at IS NULL
                 AND identity.edge_event_type_matches(w.events, e.type)
            ELSE w.id = $2::uuid END
RETURNING id::text AS id, webhook_id::text AS webhook_id
"""
NOTIFY = f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')"


@dataclass(frozen=True, slots=True)
class Claim:
    """One attempt leased to this process."""

    id: str
    lease_token: str
    webhook_id: str
    tenant_id: str
    event_id: str
    event_type: str
    payload: str  # the body, exactly as sent and signed
    attempt: int
    url: str
    secret: str
    deliverable: bool


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an attempt came to; ``error`` is None on success."""

    status: int | None
    body: str | None
    duration_ms: int
    error: str | None

    @property
    def succeeded(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class Recorded:
    recorded: bool  # False: the lease had passed to another dispatcher
    disabled_now: bool
    retried: bool
    ended: int


class DeliveryStore:
    def __init__(self, pool: asyncpg.Pool, *, lease_s: float) -> None:
        self._pool = pool
        self._lease = lease_s

    async def claim(self, limit: int, room: Mapping[str, int], per_webhook: int) -> list[Claim]:
        """At most ``limit`` due attempts, at most ``room[w]`` (else ``per_webhook``) of
        webhook ``w``; webhooks with no room left are skipped."""
        full = [w for w, n in room.items() if n <= 0]
        busy = [w for w, n in room.items() if n > 0]
        rows = await self._pool.fetch(
            CLAIM,
            limit,
            full,
            busy,
            [room[w] for w in busy],
            per_webhook,
            self._lease,
        )
        return [Claim(**dict(r)) for r in rows]

    async def record(
        self, claim: Claim, url: str, outcome: Outcome, retry_in_s: float | None, disable_after: int
    ) -> Recorded:
        row = await self._pool.fetchrow(
            RECORD,
            uuid.UUID(claim.id),
            uuid.UUID(claim.lease_token),
            url,
            outcome.status,
            outcome.body,
            outcome.duration_ms,
            outcome.succeeded,
            outcome.error,
            retry_in_s,
            disable_after,
        )
        assert row is not None
        return Recorded(
            row["recorded"] == 1, row["disabled_now"], row["retried"] == 1, row["ended"]
        )

    async def end_claimed(self, claim: Claim) -> None:
        await self._pool.execute(END_CLAIMED, uuid.UUID(claim.id), uuid.UUID(claim.lease_token))

    async def next_due_in(self, full: list[str]) -> float | None:
        value = await self._pool.fetchval(NEXT_DUE, full)
        return None if value is None else float(value)

    async def figures(self) -> tuple[int, int]:
        row = await self._pool.fetchrow(FIGURES)
        assert row is not None
        return int(row["due"]), int(row["disabled"])

    async def delete_expired(self, days: int, batch: int) -> int:
        """One batch of each table; the number of rows deleted (0: nothing left)."""
        events = await self._pool.execute(DELETE_EVENTS, days, batch)
        attempts = await self._pool.execute(DELETE_ATTEMPTS, days, batch)
        return _count(events) + _count(attempts)


def _count(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


class AdminError(Exception):
    """An operator command refused; ``str()`` is one line."""


async def publish(
    conn: asyncpg.Connection,
    tenant_slug: str,
    event_type: str,
    data: str,
    event_id: str,
    occurred_at: datetime,
) -> bool:
    tenant = await conn.fetchval(TENANT_BY_SLUG, tenant_slug)
    if tenant is None:
        raise AdminError(f"--tenant: no tenant with slug {tenant_slug!r}")
    new: bool = await conn.fetchval(PUBLISH, event_id, tenant, event_type, data, occurred_at)
    return new


async def enable(conn: asyncpg.Connection, webhook_id: str) -> None:
    if await conn.fetchval(ENABLE, webhook_id) is None:
        raise AdminError(f"WEBHOOK_ID: no webhook {webhook_id}")


async def replay(
    conn: asyncpg.Connection, event_id: str, webhook_id: str | None
) -> list[dict[str, str]]:
    """New deliveries (attempt 1, due now) of the event: to ``webhook_id``, or to every webhook
    that matches it now. The dispatchers are woken at commit."""
    async with conn.transaction():
        tenant = await conn.fetchval(EVENT, event_id)
        if tenant is None:
            raise AdminError(f"--event: no event {event_id} (unknown, or past retention)")
        if webhook_id is not None:
            hook = await conn.fetchrow(WEBHOOK, webhook_id)
            if hook is None or hook["tenant_id"] != tenant:
                raise AdminError(f"--webhook: no webhook {webhook_id} of the event's tenant")
            if not hook["is_active"] or hook["disabled_at"] is not None:
                raise AdminError(
                    f"--webhook: webhook {webhook_id} is disabled or inactive "
                    "(`webhooks enable` it first)"
                )
        rows = await conn.fetch(REPLAY, event_id, webhook_id)
        if rows:
            await conn.execute(NOTIFY)
    return [dict(r) for r in rows]
