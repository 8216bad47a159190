"""Token buckets in Redis, shared by every proxy process (CONTRACT §6).

Why each piece is here:

- **One Lua script** implements ``core.bucket.take`` for a whole batch of checks, with Redis's
  own clock (``TIME``), so decisions are exact across any number of processes and immune to
  their clock skew. A rejected check writes back only the refill, taking no token.
- **Batching per event-loop turn**: checks arriving in the same turn go to Redis as ONE script
  call (per hash slot in cluster mode, where each key id is its own hash tag), so the Redis cost
  per request falls as load rises. ``commands_sent`` counts what was really sent.
- **Known-over-limit short-cut**: after Redis rejects a key, further checks for it are rejected
  locally until a token can exist again. It only ever rejects, never grants, so no token is
  granted that Redis did not grant.
- **A pipelined client** (``stores.resp``) for standalone and Sentinel: every call goes out
  on one connection as soon as it is made, and the reply settles the batch through a callback
  (no task, no pool, no lock per call). Redis Cluster keeps redis-py's client for its slot map.
- **A deadline per call and no retries**: one timer per call cancels it; redis-py's defaults
  (seconds of socket timeout, retries with backoff) would stall every request while Redis is
  gone.
- **A circuit breaker**: the first failed call (refused, reset, or no answer within the
  deadline) opens it; while open nobody waits on Redis at all, and a background probe closes it
  again as soon as Redis answers. A dead or black-holed Redis thus costs one deadline, not one
  per request. ``failure_mode = "open"`` answers from an in-process bucket of
  ``rpm / expected_instances``; ``"closed"`` answers 503 ``rate_limiter_unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol
from urllib.parse import urlsplit

from cachetools import TLRUCache

from proxy.background import RecoveryProbe
from proxy.core.bucket import Decision, decide, seconds_until_token
from proxy.errors import RateLimiterUnavailable
from proxy.stores.buckets import MemoryBucketStore
from proxy.stores.resp import PipelinedRedis, RespError, parse_url

log = logging.getLogger("proxy.ratelimit")

# KEYS: one bucket per check (a key may repeat: checks apply in order). ARGV: the capacity of
# each check (negative: a peek, which reports and takes nothing, like core.bucket.peek), then
# optionally a fixed "now" (tests only: the table shared with core.bucket).
BATCH_SCRIPT = """
local n = #KEYS
local now
if ARGV[n + 1] then
  now = tonumber(ARGV[n + 1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- Each distinct bucket is read once and written once per batch, however many of its checks
-- the batch holds: they all happen at the same "now", one after another. A bucket only peeked
-- at is not written: its refill is a function of what is stored, so writing it back would
-- change nothing but its key, its timestamp and its expiry (a peek leaves Redis as it was).
local tokens_of, capacity_of, order, taken = {}, {}, {}, {}
local out = {}
for i = 1, n do
  local key = KEYS[i]
  local capacity = tonumber(ARGV[i])
  local peek = capacity < 0
  if peek then capacity = -capacity end
  local rate = capacity / 60
  local tokens = tokens_of[key]
  if tokens == nil then
    local stored = redis.call('GET', key)
    local t, ts
    if stored then
      local sep = string.find(stored, ' ', 1, true)
      t, ts = tonumber(string.sub(stored, 1, sep - 1)), tonumber(string.sub(stored, sep + 1))
    end
    if t == nil or ts == nil then
      tokens = capacity
    else
      local elapsed = now - ts
      if elapsed < 0 then elapsed = 0 end
      tokens = math.min(capacity, t + elapsed * rate)
    end
    order[#order + 1] = key
  else
    tokens = math.min(capacity, tokens)
  end
  local allowed = 0
  if not peek then taken[key] = true end
  if tokens >= 1 then
    if not peek then tokens = tokens - 1 end
    allowed = 1
  end
  tokens_of[key] = tokens
  capacity_of[key] = capacity
  out[#out + 1] = allowed
  out[#out + 1] = string.format('%.17g', tokens)
end
for _, key in ipairs(order) do
  if taken[key] then
    local tokens, capacity = tokens_of[key], capacity_of[key]
    -- Gone once it would be full again: an absent bucket and a full one are the same.
    local ttl = math.ceil((capacity - tokens) / (capacity / 60) * 1000) + 1000
    redis.call('SET', key, string.format('%.17g %.17g', tokens, now), 'PX', ttl)
  end
end
return out
"""


def bucket_key(bucket: str) -> str:
    """``{...}`` is a hash tag (Redis Cluster spec): one bucket, one slot, any node."""
    return f"edge:rl:{{{bucket}}}"


@dataclass(slots=True)
class _Check:
    bucket: str
    capacity: int
    future: asyncio.Future[Decision]
    peek: bool = False


def _until(_bucket: str, limited: tuple[float, float, int, float], _now: float) -> float:
    return limited[0]


class ScriptClient(Protocol):
    """What the store needs of Redis: the batch script, a ping, and a way to drop a link."""

    async def start(self) -> None:
        """Connect and load the script (cluster: fetch the slot map too)."""

    def run(self, keys: list[str], args: list[int]) -> asyncio.Future[Any]:
        """The batch script's reply; cancelling the future abandons the call."""

    async def ping(self) -> None: ...

    def reset(self) -> None:
        """A call failed or missed its deadline: do not trust the connection it went out on."""

    async def aclose(self) -> None: ...


class RedisBucketStore:
    def __init__(
        self,
        client: ScriptClient,
        *,
        cluster: bool,
        deadline_s: float,
        failure_mode: str,
        expected_instances: int = 1,
        probe_interval_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        max_limited: int = 50_000,
    ) -> None:
        self._client = client
        self._cluster = cluster
        self._deadline = deadline_s
        self._fail_open = failure_mode == "open"
        self._divisor = expected_instances
        self._clock = clock
        self._fallback = MemoryBucketStore(clock=clock)
        self._pending: list[_Check] = []
        self._scheduled = False
        # bucket -> (clock time it may have a token again, tokens then, capacity, clock time
        # of that reply). Bounded: keyed by whatever a limit is keyed by (a rotating client
        # address, say), it would otherwise grow for ever. An entry leaves when its time comes
        # (TLRU: time-aware, least recently used), or, past ``max_limited``, the least recently
        # used one does; losing one only costs a Redis call, since the short-cut never grants.
        self._limited: TLRUCache[str, tuple[float, float, int, float]] = TLRUCache(
            maxsize=max_limited, ttu=_until, timer=clock
        )
        self._open = False
        self._closing = False
        self._probe = RecoveryProbe(
            "redis-limiter-probe",
            probe_interval_s,
            self._ping,
            recovered=self._recovered,
            failed=client.reset,
        )
        self._inflight: set[asyncio.Future[Any]] = set()
        self.commands_sent = 0
        self.slowest_call_s = 0.0  # longest healthy round trip seen, event-loop lag included
        self.checks = 0
        self.shortcut_rejections = 0
        self.degraded_decisions = 0

    @property
    def shortcut_entries(self) -> int:
        """Buckets known to be over their limit and answered locally for now."""
        return len(self._limited)

    @property
    def healthy(self) -> bool:
        return not self._open

    async def ready(self) -> bool:
        """Fail-open is a degraded mode that covers an outage; fail-closed is not."""
        return self._fail_open or not self._open

    async def start(self) -> None:
        """Warm up before the first request: a cold cluster client must first fetch the slot
        map, and every node must load the script. Done inside a request's deadline under a
        burst, that can exceed it on a healthy Redis and fail open (over-admission). Runs before
        the proxy is ready; a Redis that is down now just starts with the breaker open."""
        try:
            async with asyncio.timeout(max(5.0, self._deadline)):
                await self._client.start()
        except Exception as e:
            self._trip(e)

    async def take(self, bucket: str, capacity: int) -> Decision:
        self.checks += 1
        now = self._clock()
        limited = self._limited.get(bucket)  # None once its time has come
        if limited is not None:
            until, tokens, cap, at = limited
            if now < until and cap == capacity:
                self.shortcut_rejections += 1
                return decide(False, tokens + (now - at) * capacity / 60, capacity)
            self._limited.pop(bucket, None)
        return await self._check(_Check(bucket, capacity, self._future()))

    async def peek(self, bucket: str, capacity: int) -> Decision:
        """Sent in the same batches as ``take`` (as a check of negative capacity)."""
        return await self._check(_Check(bucket, capacity, self._future(), peek=True))

    @staticmethod
    def _future() -> asyncio.Future[Decision]:
        return asyncio.get_running_loop().create_future()

    async def _check(self, check: _Check) -> Decision:
        if self._open:
            return self._degraded(check.bucket, check.capacity, check.peek)
        self._pending.append(check)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return await check.future

    def _degraded(self, bucket: str, capacity: int, peek: bool = False) -> Decision:
        if not self._fail_open:
            raise RateLimiterUnavailable()
        share = max(1, capacity // self._divisor)
        if peek:
            return self._fallback.peek_now(bucket, share)
        self.degraded_decisions += 1
        return self._fallback.take_now(bucket, share)

    def _flush(self) -> None:
        """One script call per batch, answered through a callback: no task per call, and the
        deadline is one timer that cancels the call."""
        batch, self._pending, self._scheduled = self._pending, [], False
        groups: dict[str, list[_Check]] = {}
        if self._cluster:
            for check in batch:  # one hash slot per bucket: one call per bucket
                groups.setdefault(check.bucket, []).append(check)
        else:
            groups[""] = batch
        loop = asyncio.get_running_loop()
        started = self._clock()
        for checks in groups.values():
            self.commands_sent += 1
            try:
                reply = self._client.run(
                    [bucket_key(c.bucket) for c in checks],
                    [-c.capacity if c.peek else c.capacity for c in checks],
                )
            except Exception as e:  # nothing may leave these checks unanswered
                self._failed(checks, e)
                continue
            timer = loop.call_later(self._deadline, reply.cancel)
            self._inflight.add(reply)
            reply.add_done_callback(partial(self._replied, checks, started, timer))

    def _replied(
        self,
        checks: list[_Check],
        started: float,
        timer: asyncio.TimerHandle,
        reply: asyncio.Future[Any],
    ) -> None:
        timer.cancel()
        self._inflight.discard(reply)
        if reply.cancelled():
            error: BaseException | None = TimeoutError("no answer within the deadline")
        else:
            error = reply.exception()
        if error is not None:
            self._failed(checks, error)
            return
        values = reply.result()
        now = self._clock()
        self.slowest_call_s = max(self.slowest_call_s, now - started)
        try:
            if not isinstance(values, list):
                raise TypeError(f"a {type(values).__name__}, not a list")
            results = [(v == 1, float(t)) for v, t in zip(values[::2], values[1::2], strict=True)]
            if len(results) != len(checks):
                raise ValueError(f"{len(results)} results for {len(checks)} checks")
        except (TypeError, ValueError) as e:  # not the script's reply: no decision from it
            self._failed(checks, e)
            return
        for c, (allowed, tokens) in zip(checks, results, strict=True):
            if not allowed:
                wait = seconds_until_token(tokens, c.capacity)
                self._limited[c.bucket] = (now + wait, tokens, c.capacity, now)
            if not c.future.done():
                c.future.set_result(decide(allowed, tokens, c.capacity))

    def _failed(self, checks: list[_Check], error: BaseException) -> None:
        """Every failure of the dependency, mapped here: each check answered degraded (or
        503), the breaker open, and a fresh connection for the probe and what follows. The
        link may be dead, or (an error reply such as READONLY) lead to a master that a
        failover demoted, which still answers the probe's PING; reconnecting asks the
        sentinels again."""
        self._client.reset()
        self._trip(error)
        for c in checks:
            if not c.future.done():
                try:
                    c.future.set_result(self._degraded(c.bucket, c.capacity, c.peek))
                except RateLimiterUnavailable as err:
                    c.future.set_exception(err)

    def _trip(self, error: BaseException) -> None:
        if self._open:
            return
        self._open = True
        if self._closing:  # no probe outlives close()
            return
        log.error(
            "redis unavailable (%s): rate limiting %s",
            type(error).__name__,
            "from in-process buckets" if self._fail_open else "refuses requests (503)",
        )
        self._probe.start()

    async def _ping(self) -> None:
        async with asyncio.timeout(self._deadline):
            await self._client.ping()

    def _recovered(self) -> None:
        self._open = False
        log.warning("redis answers again: exact rate limiting resumed")

    async def close(self) -> None:
        self._closing = True
        await self._probe.stop()
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=self._deadline)
        with contextlib.suppress(Exception):
            await self._client.aclose()


class PipelinedScriptClient:
    """Standalone and Sentinel: ``resp.PipelinedRedis``, EVALSHA with EVAL as the fallback
    for a Redis whose script cache is empty (restarted, failed over, ``SCRIPT FLUSH``)."""

    def __init__(
        self,
        redis: PipelinedRedis,
        on_close: Callable[[], Awaitable[None]] | None = None,
        script: str = BATCH_SCRIPT,
    ) -> None:
        self._redis = redis
        self._on_close = on_close  # Sentinel mode: close the connections to the sentinels
        self._script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()

    async def start(self) -> None:
        await self._redis.call("SCRIPT", "LOAD", self._script)

    def run(self, keys: list[str], args: list[int]) -> asyncio.Future[Any]:
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        pending = self._redis.call("EVALSHA", self.sha, len(keys), *keys, *args)

        def answered(call: asyncio.Future[Any]) -> None:
            error = None if call.cancelled() else call.exception()  # always retrieved
            if result.done():  # the caller stopped waiting
                return
            if isinstance(error, RespError) and str(error).startswith("NOSCRIPT"):
                nonlocal pending
                pending = self._redis.call("EVAL", self._script, len(keys), *keys, *args)
                pending.add_done_callback(answered)
            elif call.cancelled():
                result.cancel()
            elif error is not None:
                result.set_exception(error)
            else:
                result.set_result(call.result())

        def abandoned(_: asyncio.Future[Any]) -> None:
            # The deadline passed: a call still waiting for a connection is never sent, so
            # Redis takes no token for a request already answered without it.
            if result.cancelled():
                pending.cancel()

        pending.add_done_callback(answered)
        result.add_done_callback(abandoned)
        return result

    async def ping(self) -> None:
        await self._redis.call("PING")

    def reset(self) -> None:
        self._redis.reset()

    async def aclose(self) -> None:
        await self._redis.aclose()
        if self._on_close is not None:
            await self._on_close()


class ClusterScriptClient:
    """Redis Cluster: redis-py's client, which keeps the slot map and follows MOVED/ASK."""

    def __init__(self, client: Any, script: str = BATCH_SCRIPT) -> None:
        self._client = client
        self._text = script
        self._script = client.register_script(script)

    async def start(self) -> None:
        await self._client.initialize()
        await self._client.script_load(self._text)

    def run(self, keys: list[str], args: list[int]) -> asyncio.Future[Any]:
        call: asyncio.Future[Any] = asyncio.ensure_future(self._script(keys=keys, args=args))
        return call

    async def ping(self) -> None:
        await self._client.ping()

    def reset(self) -> None:
        pass  # redis-py drops a connection whose call was cancelled

    async def aclose(self) -> None:
        await self._client.aclose()


def make_client(
    url: str,
    mode: str,
    sentinel_service: str | None,
    deadline_s: float,
    script: str = BATCH_SCRIPT,
) -> ScriptClient:
    """The script client for the deployment's topology, running ``script`` (the limiter's by
    default). redis-py's retries are off where it is used: the store has its own deadline and
    circuit breaker, and retries would multiply the wait."""
    host, port, options = parse_url(url)
    if mode == "cluster":
        from redis.asyncio import RedisCluster
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        return ClusterScriptClient(
            RedisCluster.from_url(
                url,
                socket_connect_timeout=deadline_s,
                socket_timeout=max(deadline_s, 1.0),
                retry=Retry(NoBackoff(), 0),
            ),
            script,
        )
    if mode == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        # The URL names a sentinel; its credentials and database are the master's.
        sentinel = Sentinel(
            [(host, port if urlsplit(url).port else 26379)],
            sentinel_kwargs={
                "socket_connect_timeout": deadline_s,
                "socket_timeout": max(deadline_s, 1.0),
            },
        )

        async def master() -> tuple[str, int]:
            address: tuple[str, int] = await sentinel.discover_master(sentinel_service or "")
            return address

        async def close_sentinels() -> None:
            for client in sentinel.sentinels:
                await client.aclose()

        # With rediss://, the master's certificate is checked against the address the
        # sentinels report (usually an IP): it must name that address.
        return PipelinedScriptClient(
            PipelinedRedis(master, connect_timeout_s=deadline_s, **options), close_sentinels, script
        )
    return PipelinedScriptClient(
        PipelinedRedis.from_url(url, connect_timeout_s=deadline_s), script=script
    )
