"""Monthly render-quota stores (CONTRACT §13): reserve a unit at admission, then settle it once
the answer is known (kept when the upstream answered 2xx, given back otherwise).

- ``RedisQuotaStore`` (``REDIS_URL`` set) is exact across every process: each decision is made
  by a Lua script on two keys that share the tenant's hash tag (Redis Cluster spec), so that one
  node decides it atomically: the month's count, and the reservations in flight as a sorted set
  scored by their expiry on Redis's clock. The decisions of one event-loop turn share one
  script call (per tenant in cluster mode), as the limiter's checks do. A process that dies
  holding reservations loses them after ``ratelimit.quota_lease_s`` (they are swept at each
  decision), and the count expires after its month. A missing count (a flushed or failed-over
  Redis) is rebuilt from the month's ``renders_started`` in Postgres. Redis unreachable:
  ``failure_mode = "open"`` admits this process's share of the last known remainder
  (``core.quota.outage_share``), and the units it kept are added to the count when Redis
  answers again; ``"closed"`` answers 503.
- ``MemoryQuotaStore`` (no ``REDIS_URL``) applies the same rule in process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime
from functools import partial
from typing import Any

from proxy.background import RecoveryProbe
from proxy.core.quota import (
    admits,
    first_day,
    month_id,
    month_start_of,
    next_month_start,
    outage_share,
    remaining,
)
from proxy.errors import ProxyError, RateLimiterUnavailable, TenantStoreUnavailable
from proxy.stores.redis import ScriptClient

log = logging.getLogger("proxy.quota")

# The month's renders_started of a tenant (Postgres), for a count that is missing.
RebuildSource = Callable[[str, date], Awaitable[int]]

RESERVE, COMMIT, RELEASE, PEEK, ADD = 1, 2, 3, 4, 5
REPLAY_BATCH = 500  # settlements per script call when Redis answers again
NO_COUNT = -1  # the script's answer when the month's count is missing; also "no rebuilt value"

# One call decides a batch of operations, each atomically (a script runs alone on its node).
# Per operation, KEYS: the month's count of renders started, the reservations in flight (a sorted
# set; member: reservation id, score: its expiry in ms on Redis's clock), and the ids of the units
# added without a reservation that were already applied (a set expiring with the count). ARGV, 7
# per operation: op, quota, reservation or unit id (0: none), lease ms, count expiry (Unix s),
# rebuilt count (-1: none), amount to add. Replies: 3 integers per operation. Settling is
# idempotent, so a settlement whose reply was lost can be sent again: a commit counts only when
# it removes its reservation, and an add only when its id is new to the applied set. A peek
# (``/explain``) writes nothing, not even the expired reservations' removal: it answers whether
# the count exists (1, else -1), the count, and the reservations not yet expired, and
# ``core.quota.admits`` decides in the caller.
QUOTA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS / 3 do
  local count_key, held_key, applied_key = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local a = 7 * (i - 1)
  local op, id = tonumber(ARGV[a + 1]), ARGV[a + 3]
  local r1, r2, r3 = 1, 0, 0
  if op == 4 then
    local count = redis.call('GET', count_key)
    if count then r2 = tonumber(count) else r1 = -1 end
    r3 = redis.call('ZCOUNT', held_key, '(' .. now, '+inf')
  elseif op == 5 then
    -- A missing count is rebuilt from Postgres, which has (or will have) this unit.
    if redis.call('EXISTS', count_key) == 1 and redis.call('SADD', applied_key, id) == 1 then
      redis.call('INCRBY', count_key, tonumber(ARGV[a + 7]))
      redis.call('EXPIREAT', applied_key, tonumber(ARGV[a + 5]))
    end
  elseif op ~= 1 then
    local removed = redis.call('ZREM', held_key, id)
    if op == 2 and removed == 1 and redis.call('EXISTS', count_key) == 1 then
      redis.call('INCRBY', count_key, tonumber(ARGV[a + 7]))
    end
  else
    local count = redis.call('GET', count_key)
    local rebuilt = tonumber(ARGV[a + 6])
    if not count and rebuilt >= 0 then
      count = rebuilt
      redis.call('SET', count_key, count)
      redis.call('EXPIREAT', count_key, tonumber(ARGV[a + 5]))
    end
    if not count then
      r1 = -1
    else
      count = tonumber(count)
      redis.call('ZREMRANGEBYSCORE', held_key, '-inf', now)
      local held = redis.call('ZCARD', held_key)
      if count + held < tonumber(ARGV[a + 2]) then
        local lease = tonumber(ARGV[a + 4])
        redis.call('ZADD', held_key, now + lease, id)
        redis.call('PEXPIRE', held_key, lease)
        r1, r2, r3 = 1, count, held + 1
      else
        r1, r2, r3 = 0, count, held
      end
    end
  end
  out[#out + 1] = r1
  out[#out + 1] = r2
  out[#out + 1] = r3
end
return out
"""


def quota_keys(tenant_id: str, month: str) -> list[str]:
    """``{tenant}`` is the hash tag: the keys of a decision live on one node."""
    base = f"edge:quota:{{{tenant_id}}}:{month}"
    return [f"{base}:count", f"{base}:held", f"{base}:applied"]


@dataclass(slots=True)
class _Op:
    tenant_id: str  # its hash tag: the group it is sent in, in cluster mode
    keys: list[str]
    args: list[int]
    future: asyncio.Future[list[int]]


@dataclass(frozen=True, slots=True)
class Reservation:
    tenant_id: str
    month: str
    id: int  # 0: in process, or admitted while Redis was unreachable
    expires: int  # Unix seconds when the month's count expires (the month's end + the lease)
    degraded: bool = False


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    admitted: bool
    left: int  # the quota minus the count and the reservations in flight (this one included)
    reservation: Reservation | None  # set when admitted


@dataclass(slots=True)
class QuotaCounters:
    admitted: int = 0
    refused: int = 0
    degraded_admitted: int = 0  # fail-open admissions while Redis was unreachable
    degraded_refused: int = 0
    unavailable: int = 0  # 503 under failure_mode = "closed"
    kept: int = 0  # reservations turned into renders started
    given_back: int = 0
    rebuilds: int = 0  # month counts rebuilt from renders_started


async def no_history(_tenant_id: str, _month: date) -> int:
    """Embedded mode: no database holds earlier renders."""
    return 0


class _Rebuilds:
    """One query of the month's renders per tenant however many requests wait for it."""

    def __init__(self, source: RebuildSource, counters: QuotaCounters) -> None:
        self._source = source
        self._counters = counters
        self._loading: dict[tuple[str, date], asyncio.Future[int]] = {}

    async def count(self, tenant_id: str, now: datetime, *, rebuild: bool = True) -> int:
        """``rebuild=False``: the count is only read (a peek), not put back, so it is not
        counted as a rebuild; nor is a query that failed. Postgres unavailable: 503
        ``tenant_store_unavailable`` with ``Retry-After: 1`` (RFC 9110 §10.2.3), never a
        guess at the count."""
        key = (tenant_id, first_day(now))
        loading = self._loading.get(key)
        if loading is None:
            loading = asyncio.ensure_future(self._load(key, rebuild))
            self._loading[key] = loading
            loading.add_done_callback(lambda _: self._loading.pop(key, None))
        try:
            return await asyncio.shield(loading)
        except ProxyError as e:
            raise TenantStoreUnavailable(headers={"Retry-After": "1"}) from e

    async def _load(self, key: tuple[str, date], rebuild: bool) -> int:
        n = await self._source(*key)
        if rebuild:
            self._counters.rebuilds += 1
        return n


class MemoryQuotaStore:
    """In process: exact for this process only."""

    def __init__(self, rebuild: RebuildSource = no_history) -> None:
        self._month = ""
        self._counts: dict[str, int] = {}
        self._held: dict[str, int] = {}
        self.counters = QuotaCounters()
        self._rebuilds = _Rebuilds(rebuild, self.counters)

    async def reserve(self, tenant_id: str, quota: int, now: datetime) -> QuotaDecision:
        month = month_id(now)
        if month != self._month:  # a new month starts from nothing
            self._month, self._counts, self._held = month, {}, {}
        if tenant_id not in self._counts:
            count = await self._rebuilds.count(tenant_id, now)
            if self._month > month:
                # The next month began while Postgres answered: this request's month is over
                # and its state gone; decide from the rebuilt count, storing nothing (the
                # new month's state is not reset with this ``now``).
                if not admits(quota, count, 0):
                    self.counters.refused += 1
                    return QuotaDecision(False, remaining(quota, count, 0), None)
                self.counters.admitted += 1
                reservation = Reservation(tenant_id, month, 0, 0)
                return QuotaDecision(True, remaining(quota, count, 1), reservation)
            if self._month != month:
                return await self.reserve(tenant_id, quota, now)
            self._counts.setdefault(tenant_id, count)
        count, held = self._counts[tenant_id], self._held.get(tenant_id, 0)
        if not admits(quota, count, held):
            self.counters.refused += 1
            return QuotaDecision(False, remaining(quota, count, held), None)
        self._held[tenant_id] = held + 1
        self.counters.admitted += 1
        reservation = Reservation(tenant_id, month, 0, 0)
        return QuotaDecision(True, remaining(quota, count, held + 1), reservation)

    async def peek(self, tenant_id: str, quota: int, now: datetime) -> QuotaDecision:
        """What ``reserve`` would decide, reserving, storing and counting nothing."""
        month = month_id(now)
        count = self._counts.get(tenant_id) if month == self._month else None
        held = self._held.get(tenant_id, 0) if month == self._month else 0
        if count is None:
            count = await self._rebuilds.count(tenant_id, now, rebuild=False)
        return QuotaDecision(admits(quota, count, held), remaining(quota, count, held), None)

    def settle(
        self, tenant_id: str, month: str, reservation: Reservation | None, started: bool
    ) -> None:
        if month != self._month:
            return  # a month that is over
        if reservation is None:
            if started and tenant_id in self._counts:  # an unlimited tenant's render
                self._counts[tenant_id] += 1
            return
        self._held[tenant_id] = max(0, self._held.get(tenant_id, 0) - 1)
        if started:
            self._counts[tenant_id] = self._counts.get(tenant_id, 0) + 1
            self.counters.kept += 1
        else:
            self.counters.given_back += 1

    async def ready(self) -> bool:
        return True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class RedisQuotaStore:
    def __init__(
        self,
        client: ScriptClient,
        *,
        cluster: bool = False,
        rebuild: RebuildSource,
        deadline_s: float,
        failure_mode: str,
        expected_instances: int = 1,
        lease_s: int = 900,
        probe_interval_s: float = 0.25,
    ) -> None:
        self._client = client
        self._cluster = cluster
        self._deadline = deadline_s
        self._fail_open = failure_mode == "open"
        self._instances = expected_instances
        self._lease_ms = lease_s * 1000
        self._lease_s = lease_s
        self._open = False
        self._closing = False
        self._probe = RecoveryProbe(
            "redis-quota-probe",
            probe_interval_s,
            self._ping_and_replay,
            recovered=self._recovered,
            failed=client.reset,
        )
        self._inflight: set[asyncio.Future[Any]] = set()
        self._pending: list[_Op] = []
        self._scheduled = False
        # tenant -> (month, count + reservations) as last seen in Redis: the outage's base.
        self._last_used: dict[str, tuple[str, int]] = {}
        # While Redis is unreachable: admissions per tenant this process holds or kept, and
        # the units kept, per (tenant, month), to add to the count when Redis answers again.
        self._outage_used: dict[str, int] = {}
        self._outage_kept: dict[tuple[str, str], int] = {}
        # Settlements Redis may not have applied, by id: sent again when it answers.
        self._unsettled: dict[int, tuple[str, list[str], list[int]]] = {}
        self.counters = QuotaCounters()
        self._rebuilds = _Rebuilds(rebuild, self.counters)

    @property
    def healthy(self) -> bool:
        return not self._open

    async def ready(self) -> bool:
        return self._fail_open or not self._open

    async def start(self) -> None:
        try:
            async with asyncio.timeout(max(5.0, self._deadline)):
                await self._client.start()
        except Exception as e:
            self._trip(e)

    async def reserve(self, tenant_id: str, quota: int, now: datetime) -> QuotaDecision:
        month = month_id(now)
        expires = int(next_month_start(now).timestamp()) + self._lease_s
        if self._open:
            return await self._degraded(tenant_id, quota, now)
        rid = random.getrandbits(62) + 1
        keys = quota_keys(tenant_id, month)
        args = [RESERVE, quota, rid, self._lease_ms, expires, NO_COUNT, 0]
        try:
            admitted, count, held = await self._submit(tenant_id, keys, args)
            if admitted == NO_COUNT:
                args[5] = await self._rebuilds.count(tenant_id, now)
                admitted, count, held = await self._submit(tenant_id, keys, args[:])
        except ProxyError:  # Postgres could not say what the month's count is: a 503
            raise
        except Exception as e:  # no reply, a reply that is not the script's, an error reply
            self._client.reset()
            self._trip(e)
            # It may have been reserved all the same: give it back rather than hold a unit
            # until the lease ends.
            self._send(tenant_id, keys, [RELEASE, 0, rid, 0, expires, NO_COUNT, 0])
            return await self._degraded(tenant_id, quota, now)
        self._last_used[tenant_id] = (month, count + held)
        if self._outage_used:  # admissions made without Redis are behind us
            self._outage_used.pop(tenant_id, None)
        if admitted != 1:
            self.counters.refused += 1
            return QuotaDecision(False, remaining(quota, count, held), None)
        self.counters.admitted += 1
        return QuotaDecision(
            True, remaining(quota, count, held), Reservation(tenant_id, month, rid, expires)
        )

    async def peek(self, tenant_id: str, quota: int, now: datetime) -> QuotaDecision:
        """What ``reserve`` would decide, from a script call that writes nothing (a missing
        count is read from Postgres, not put back); while Redis is unreachable, what the
        outage rule would decide. Counts nothing."""
        if self._open:
            return await self._degraded_peek(tenant_id, quota, now)
        args = [PEEK, quota, 0, 0, 0, NO_COUNT, 0]
        try:
            exists, count, held = await self._submit(
                tenant_id, quota_keys(tenant_id, month_id(now)), args
            )
            if exists == NO_COUNT:
                count = await self._rebuilds.count(tenant_id, now, rebuild=False)
        except ProxyError:  # Postgres could not say what the month's count is: a 503
            raise
        except Exception as e:  # as in reserve: the breaker opens
            self._client.reset()
            self._trip(e)
            return await self._degraded_peek(tenant_id, quota, now)
        return QuotaDecision(admits(quota, count, held), remaining(quota, count, held), None)

    def _submit(
        self, tenant_id: str, keys: list[str], args: list[int]
    ) -> asyncio.Future[list[int]]:
        """Operations made in one event-loop turn go to Redis as one script call (per tenant
        in cluster mode, where each tenant is its own hash tag), as the limiter's checks do."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[int]] = loop.create_future()
        self._pending.append(_Op(tenant_id, keys, args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        batch, self._pending, self._scheduled = self._pending, [], False
        groups: dict[str, list[_Op]] = {}
        for op in batch:
            groups.setdefault(op.tenant_id if self._cluster else "", []).append(op)
        loop = asyncio.get_running_loop()
        for ops in groups.values():
            try:
                reply = self._client.run(
                    [k for op in ops for k in op.keys], [a for op in ops for a in op.args]
                )
            except Exception as e:  # nothing may leave these operations unanswered
                self._answer(ops, None, e)
                continue
            timer = loop.call_later(self._deadline, reply.cancel)
            self._inflight.add(reply)
            reply.add_done_callback(partial(self._replied, ops, timer))

    def _replied(
        self, ops: list[_Op], timer: asyncio.TimerHandle, reply: asyncio.Future[Any]
    ) -> None:
        timer.cancel()
        self._inflight.discard(reply)
        if reply.cancelled():
            self._answer(ops, None, TimeoutError("no answer within the deadline"))
            return
        error = reply.exception()
        values = None if error is not None else reply.result()
        if error is None and (not isinstance(values, list) or len(values) != 3 * len(ops)):
            error = TypeError(f"not the quota script's reply: {values!r}")
        self._answer(ops, values, error)

    def _answer(
        self, ops: list[_Op], values: list[Any] | None, error: BaseException | None
    ) -> None:
        for i, op in enumerate(ops):
            if op.future.done():  # its caller stopped waiting (a client that left)
                held = error is not None or values is None or int(values[3 * i]) == 1
                if op.args[0] == RESERVE and held:
                    # A unit it reserved (or may have) goes back now, not at the lease's end.
                    self._send(op.tenant_id, op.keys, [RELEASE, *op.args[1:]])
                continue
            if error is not None or values is None:
                op.future.set_exception(error or TypeError("no reply"))
            else:
                op.future.set_result([int(v) for v in values[3 * i : 3 * i + 3]])

    async def _degraded(self, tenant_id: str, quota: int, now: datetime) -> QuotaDecision:
        if not self._fail_open:
            self.counters.unavailable += 1
            raise RateLimiterUnavailable()
        share, mine = await self._outage_room(tenant_id, quota, now)
        if mine >= share:
            self.counters.degraded_refused += 1
            return QuotaDecision(False, 0, None)
        self._outage_used[tenant_id] = mine + 1
        self.counters.degraded_admitted += 1
        reservation = Reservation(tenant_id, month_id(now), 0, 0, degraded=True)
        return QuotaDecision(True, share - mine - 1, reservation)

    async def _degraded_peek(self, tenant_id: str, quota: int, now: datetime) -> QuotaDecision:
        if not self._fail_open:
            raise RateLimiterUnavailable()
        share, mine = await self._outage_room(tenant_id, quota, now)
        return QuotaDecision(mine < share, max(0, share - mine), None)

    async def _outage_room(self, tenant_id: str, quota: int, now: datetime) -> tuple[int, int]:
        """This process's share of the month's last known remainder while Redis is
        unreachable, and the admissions it holds or kept of it."""
        month = month_id(now)
        last = self._last_used.get(tenant_id)
        if last is None or last[0] != month:
            # Never seen this month: Postgres's count is the best base there is.
            used = await self._rebuilds.count(tenant_id, now)  # unavailable: a 503
            last = self._last_used[tenant_id] = (month, used)
        share = outage_share(quota - last[1], self._instances)
        return share, self._outage_used.get(tenant_id, 0)

    def settle(
        self, tenant_id: str, month: str, reservation: Reservation | None, started: bool
    ) -> None:
        """Keep or give back a unit; never waits (the answer is already on its way)."""
        if reservation is None:
            if started:  # an unlimited tenant's render: the count stays right if a quota is set
                self._keep_later(tenant_id, month, 1)
            return
        if started:
            self.counters.kept += 1
        else:
            self.counters.given_back += 1
        if reservation.degraded:
            if started:
                self._keep_later(tenant_id, reservation.month, 1)
            else:
                self._outage_used[tenant_id] = max(0, self._outage_used.get(tenant_id, 0) - 1)
            return
        op = COMMIT if started else RELEASE
        args = [op, 0, reservation.id, 0, reservation.expires, NO_COUNT, 1]
        self._send(tenant_id, quota_keys(tenant_id, reservation.month), args)

    def _keep_later(self, tenant_id: str, month: str, n: int) -> None:
        if self._open:
            key = (tenant_id, month)
            self._outage_kept[key] = self._outage_kept.get(key, 0) + n
            return
        self._send(tenant_id, quota_keys(tenant_id, month), self._add_args(month, n))

    def _add_args(self, month: str, n: int) -> list[int]:
        """``n`` units kept without a reservation, under an id of their own: applied once
        however often they are sent."""
        expires = int(next_month_start(month_start_of(month)).timestamp()) + self._lease_s
        return [ADD, 0, random.getrandbits(62) + 1, 0, expires, NO_COUNT, n]

    def _send(self, tenant_id: str, keys: list[str], args: list[int]) -> None:
        """A settlement in the background, answered through a callback (no task per call).
        One that Redis may not have applied waits, under its id, to be sent again once Redis
        answers (settling is idempotent, so one that ran late is not applied twice)."""
        if self._open:
            self._unsettled[args[2]] = (tenant_id, keys, args)
            return
        reply = self._submit(tenant_id, keys, args)

        def done(t: asyncio.Future[list[int]]) -> None:
            error = None if t.cancelled() else t.exception()
            if t.cancelled() or error is not None:
                self._unsettled[args[2]] = (tenant_id, keys, args)
                if not self._closing:
                    self._client.reset()
                    self._trip(error or TimeoutError("no answer within the deadline"))

        reply.add_done_callback(done)

    def _trip(self, error: BaseException) -> None:
        if self._open:
            return
        self._open = True
        self._outage_used.clear()
        if self._closing:
            return
        log.error(
            "redis unavailable (%s): the render quota %s",
            type(error).__name__,
            "admits each process's share" if self._fail_open else "refuses requests (503)",
        )
        self._probe.start()

    async def _ping_and_replay(self) -> None:
        async with asyncio.timeout(self._deadline):
            await self._client.ping()
        await self._replay()

    def _recovered(self) -> None:
        self._open = False
        self._outage_used.clear()
        log.warning("redis answers again: exact render quota resumed")

    async def _replay(self) -> None:
        """Send again the settlements Redis may not have applied, and add the units kept
        during the outage to the months' counts (each under an id, so a replay whose reply is
        lost again is applied once)."""
        for (tenant_id, month), n in self._outage_kept.items():
            args = self._add_args(month, n)
            self._unsettled[args[2]] = (tenant_id, quota_keys(tenant_id, month), args)
        self._outage_kept.clear()
        while self._unsettled:
            batch = list(self._unsettled.items())[:REPLAY_BATCH]
            await asyncio.gather(*(self._submit(*op) for _, op in batch))
            for rid, _ in batch:
                self._unsettled.pop(rid, None)

    async def close(self) -> None:
        self._closing = True
        await self._probe.stop()
        if self._pending:
            self._flush()
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=self._deadline)
        with contextlib.suppress(Exception):
            await self._client.aclose()
