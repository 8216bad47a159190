"""The Redis render-quota store against a real Redis (CONTRACT §13): leases of a process that
died, Redis unreachable under both failure modes (and a proxy process in closed mode), the units
kept meanwhile, and Redis Cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path

import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from proxy.app import quota_metrics
from proxy.core.quota import month_id
from proxy.errors import RateLimiterUnavailable, TenantStoreUnavailable
from proxy.stores.quota import QUOTA_SCRIPT, RedisQuotaStore, quota_keys
from proxy.stores.redis import make_client
from tests.e2e.support import within
from tests.procs import Echo, raw_request, start_proxy, stop, write_config
from tests.servers import RedisClusterServer, RedisServer

TENANT = "eeeeeeee-0000-0000-0000-000000000001"
HOST = "renders.quota.test"
DEADLINE_S = 1.0  # generous: a call missing it on a busy machine would trip the breaker


class History:
    """The month's renders_started as Postgres would report it."""

    def __init__(self, renders: int = 0) -> None:
        self.renders = renders
        self.asked = 0

    async def __call__(self, _tenant_id: str, _month: date) -> int:
        self.asked += 1
        return self.renders


def store(
    redis: RedisServer, history: History, deadline_s: float = DEADLINE_S, **options: object
) -> RedisQuotaStore:
    client = make_client(redis.url, "standalone", None, deadline_s, QUOTA_SCRIPT)
    return RedisQuotaStore(
        client,
        rebuild=history,
        deadline_s=deadline_s,
        probe_interval_s=0.05,
        **options,  # type: ignore[arg-type]
    )


@pytest_asyncio.fixture
async def raw(own_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(own_redis.url)
    yield client
    await client.aclose()


async def test_a_dead_processs_reservation_expires_after_its_lease(
    own_redis: RedisServer,
) -> None:
    now = datetime.now(UTC)
    dying = store(own_redis, History(), failure_mode="closed", lease_s=1)
    other = store(own_redis, History(), failure_mode="closed", lease_s=1)
    await dying.start()
    await other.start()
    try:
        held = await dying.reserve(TENANT, 1, now)
        assert held.admitted  # and never settled: its process is gone
        assert not (await other.reserve(TENANT, 1, now)).admitted

        async def freed() -> bool:
            return (await other.reserve(TENANT, 1, now)).admitted

        await within(5, freed)
    finally:
        await dying.close()
        await other.close()


async def test_the_count_expires_after_its_month(
    own_redis: RedisServer, raw: aioredis.Redis
) -> None:
    now = datetime.now(UTC)
    quotas = store(own_redis, History(7), failure_mode="closed", lease_s=60)
    await quotas.start()
    try:
        decision = await quotas.reserve(TENANT, 10, now)
        assert decision.admitted and decision.left == 2  # 7 rebuilt, 1 in flight
        count_key, held_key = quota_keys(TENANT, month_id(now))[:2]
        assert int(await raw.get(count_key)) == 7
        expires_at = await raw.expiretime(count_key)
        assert expires_at == decision.reservation.expires  # type: ignore[union-attr]
        assert 0 < await raw.pttl(held_key) <= 60_000
    finally:
        await quotas.close()


async def test_closed_mode_refuses_while_redis_is_down_and_recovers(
    own_redis: RedisServer,
) -> None:
    now = datetime.now(UTC)
    quotas = store(own_redis, History(), failure_mode="closed")
    await quotas.start()
    try:
        assert (await quotas.reserve(TENANT, 5, now)).admitted
        own_redis.stop()
        with pytest.raises(RateLimiterUnavailable):
            await quotas.reserve(TENANT, 5, now)
        assert not await quotas.ready()
        own_redis.start()

        async def back() -> bool:
            try:
                return (await quotas.reserve(TENANT, 5, now)).admitted
            except RateLimiterUnavailable:
                return False

        await within(5, back)
        assert quotas.counters.unavailable >= 1
    finally:
        await quotas.close()


async def test_open_mode_admits_a_share_of_the_last_known_remainder(
    own_redis: RedisServer, raw: aioredis.Redis
) -> None:
    now = datetime.now(UTC)
    month = month_id(now)
    quotas = store(own_redis, History(), failure_mode="open", expected_instances=2)
    await quotas.start()
    try:
        for _ in range(2):
            d = await quotas.reserve(TENANT, 10, now)
            quotas.settle(TENANT, month, d.reservation, True)
        count_key = quota_keys(TENANT, month)[0]

        async def counted(n: int) -> bool:
            return int(await raw.get(count_key) or 0) == n

        await within(5, lambda: counted(2))
        own_redis.pause()  # black-holed: calls miss their deadline
        # 10 - 2 = 8 left when Redis was last seen, two instances: 4 for this process.
        outage = [await quotas.reserve(TENANT, 10, now) for _ in range(5)]
        assert [d.admitted for d in outage] == [True] * 4 + [False]
        quotas.settle(TENANT, month, outage[0].reservation, False)  # given back: one more
        again = await quotas.reserve(TENANT, 10, now)
        assert again.admitted
        assert not (await quotas.reserve(TENANT, 10, now)).admitted
        for d in [*outage[1:4], again]:
            quotas.settle(TENANT, month, d.reservation, True)
        own_redis.resume()
        # The four renders started during the outage reach the shared count.
        await within(5, lambda: counted(6))
        await within(5, lambda: _healthy(quotas))
        decision = await quotas.reserve(TENANT, 10, now)
        assert decision.admitted and decision.left == 3
        assert quotas.counters.degraded_admitted == 5
    finally:
        own_redis.resume()
        await quotas.close()


async def _healthy(quotas: RedisQuotaStore) -> bool:
    return quotas.healthy


async def test_cluster_mode_decides_on_the_tenants_node(redis_cluster: RedisClusterServer) -> None:
    """Both keys of a decision carry the tenant's hash tag: one node runs the script (a
    CROSSSLOT error otherwise), and different tenants spread over the nodes."""
    await redis_cluster.astart()  # heals after a test that left a node down
    now = datetime.now(UTC)
    client = make_client(redis_cluster.url, "cluster", None, DEADLINE_S, QUOTA_SCRIPT)
    quotas = RedisQuotaStore(
        client, cluster=True, rebuild=History(), deadline_s=DEADLINE_S, failure_mode="closed"
    )
    await quotas.start()
    try:
        tenants = [f"eeeeeeee-0000-0000-0000-{i:012d}" for i in range(12)]
        for tenant in tenants:
            first = await quotas.reserve(tenant, 1, now)
            assert first.admitted
            assert not (await quotas.reserve(tenant, 1, now)).admitted
            quotas.settle(tenant, month_id(now), first.reservation, False)
            assert (await quotas.reserve(tenant, 1, now)).admitted  # given back
        assert quotas.healthy and quotas.counters.rebuilds == len(tenants)
        nodes = {
            redis_cluster.node_for_slot(_slot(quota_keys(t, month_id(now))[0])) for t in tenants
        }
        assert len(nodes) > 1
    finally:
        await quotas.close()


def _slot(key: str) -> int:
    from redis.crc import key_slot

    return int(key_slot(key.encode()))


def test_a_proxy_in_closed_mode_refuses_metered_posts_while_redis_is_down(
    own_redis: RedisServer, echo: Echo, tmp_path: Path
) -> None:
    """Through a real process: no key on the route, so the 503 is the quota's own."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(
        f'[[tenants]]\nid = "{TENANT}"\nslug = "quota"\nstatus = "Active"\n'
        f'custom_domain = "{HOST}"\ndomain_verified = true\nmonthly_render_qty = 5\n'
    )
    config = write_config(
        tmp_path / "edge.toml",
        tenancy={"embedded_file": str(tenants)},
        upstreams={"render-api": {"urls": [echo.url]}},
        routes=[
            {
                "prefix": "/v1/renders",
                "upstream": "render-api",
                "auth": "none",
                "audit": True,
                "meter": "renders",
            }
        ],
    )
    config.write_text(
        config.read_text()
        + f'\n[audit]\njsonl_path = "{tmp_path / "audit.jsonl"}"\n'
        + '[ratelimit]\nfailure_mode = "closed"\ntimeout_ms = 1000\n'
    )
    proxy = start_proxy(config, env={"REDIS_URL": own_redis.url})
    try:

        def post() -> tuple[int, bytes]:
            r = raw_request(
                proxy.port,
                f"POST /v1/renders HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode(),
            )
            return r.status, r.body

        assert post()[0] == 200
        own_redis.stop()
        status, body = post()
        assert status == 503
        assert orjson.loads(body)["error"]["code"] == "rate_limiter_unavailable"
    finally:
        stop(proxy.proc)


async def test_a_missing_count_is_rebuilt_once_for_a_burst(own_redis: RedisServer) -> None:
    now = datetime.now(UTC)
    history = History(3)
    quotas = store(own_redis, history, failure_mode="closed")
    await quotas.start()
    try:
        decisions = await asyncio.gather(*(quotas.reserve(TENANT, 10, now) for _ in range(20)))
        assert sum(d.admitted for d in decisions) == 7
        assert history.asked == 1
    finally:
        await quotas.close()


async def _contents(raw: aioredis.Redis) -> dict[bytes, object]:
    """Every key with its value (and its expiry in whole seconds)."""
    out: dict[bytes, object] = {}
    for key in await raw.keys("*"):
        kind = await raw.type(key)
        value = (
            await raw.zrange(key, 0, -1, withscores=True) if kind == b"zset" else await raw.get(key)
        )
        out[key] = (value, await raw.ttl(key))
    return out


async def test_peek_agrees_with_reserve_and_writes_nothing(
    own_redis: RedisServer, raw: aioredis.Redis
) -> None:
    """``/explain``'s quota peek in Redis: the count and the reservations in flight as a
    reserve would see them, a missing count read from Postgres and not put back, and not one
    key, value or expiry changed; nothing counted."""
    now = datetime.now(UTC)
    history = History(renders=1)
    quotas = store(own_redis, history, failure_mode="closed")
    await quotas.start()
    try:
        first = await quotas.peek(TENANT, 3, now)  # no count in Redis yet
        assert (first.admitted, first.left, history.asked) == (True, 2, 1)
        assert await raw.keys("*") == []
        held = await quotas.reserve(TENANT, 3, now)  # rebuilds the count: 1, and holds one
        assert held.admitted
        before = await _contents(raw)
        counters = (quotas.counters.admitted, quotas.counters.refused, quotas.counters.rebuilds)
        assert (await quotas.peek(TENANT, 3, now)).left == 1
        full = await quotas.peek(TENANT, 2, now)
        assert (full.admitted, full.left) == (False, 0)
        assert await _contents(raw) == before
        assert (
            quotas.counters.admitted,
            quotas.counters.refused,
            quotas.counters.rebuilds,
        ) == counters
        assert not (await quotas.reserve(TENANT, 2, now)).admitted  # reserve agrees
    finally:
        await quotas.close()


async def test_a_commit_that_ran_late_is_not_counted_again_by_its_replay(
    own_redis: RedisServer, raw: aioredis.Redis
) -> None:
    """The commit misses its 0.2 s deadline while Redis is stopped, and runs when it resumes
    (its bytes were in the socket); the breaker opened, and the replay once Redis answers
    again finds the reservation already settled: the count is 1, not 2."""
    now = datetime.now(UTC)
    month = month_id(now)
    quotas = store(own_redis, History(), deadline_s=0.2, failure_mode="closed")
    await quotas.start()
    try:
        held = await quotas.reserve(TENANT, 10, now)
        assert held.admitted
        own_redis.pause()
        quotas.settle(TENANT, month, held.reservation, True)
        await within(5, lambda: _not_healthy(quotas))
        assert _healthy_gauge(quotas) == 0.0  # /metrics: edge_quota_redis_healthy
        own_redis.resume()
        await within(5, lambda: _healthy(quotas))
        assert _healthy_gauge(quotas) == 1.0
        count_key, held_key = quota_keys(TENANT, month)[:2]
        assert int(await raw.get(count_key)) == 1
        assert await raw.zcard(held_key) == 0
    finally:
        own_redis.resume()
        await quotas.close()


async def test_settlements_redis_refused_are_replayed_with_their_ids(
    own_redis: RedisServer, raw: aioredis.Redis
) -> None:
    """A commit and a release that Redis refused (never ran: scripts denied by ACL) free their
    own reservations when it takes scripts again, not at the lease's end, and the commit
    counts once."""
    now = datetime.now(UTC)
    month = month_id(now)
    quotas = store(own_redis, History(), failure_mode="open", lease_s=600)
    await quotas.start()
    try:
        kept, given = await quotas.reserve(TENANT, 10, now), await quotas.reserve(TENANT, 10, now)
        assert kept.admitted and given.admitted
        await raw.execute_command("ACL", "SETUSER", "default", "-evalsha", "-eval")
        quotas.settle(TENANT, month, kept.reservation, True)
        quotas.settle(TENANT, month, given.reservation, False)
        await within(5, lambda: _not_healthy(quotas))
        await raw.execute_command("ACL", "SETUSER", "default", "+@all")
        await within(5, lambda: _healthy(quotas))
        count_key, held_key = quota_keys(TENANT, month)[:2]
        assert int(await raw.get(count_key)) == 1
        for r in (kept.reservation, given.reservation):
            assert await raw.zscore(held_key, str(r.id)) is None  # type: ignore[union-attr]
    finally:
        await raw.execute_command("ACL", "SETUSER", "default", "+@all")
        await quotas.close()


async def test_a_reserve_whose_caller_left_gives_its_unit_back(
    own_redis: RedisServer, raw: aioredis.Redis
) -> None:
    """The client left while its reserve was in flight: the unit Redis reserved for it goes
    back at once, not when its lease ends."""
    now = datetime.now(UTC)
    month = month_id(now)
    quotas = store(own_redis, History(), failure_mode="closed", lease_s=600)
    await quotas.start()
    try:
        assert (await quotas.reserve(TENANT, 2, now)).admitted
        held_key = quota_keys(TENANT, month)[1]
        own_redis.pause()  # the next reserve waits in the socket
        leaving = asyncio.ensure_future(quotas.reserve(TENANT, 2, now))
        await within(5, lambda: _in_flight(quotas))
        leaving.cancel()
        own_redis.resume()
        await within(5, lambda: _zcard_is(raw, held_key, 1))
        assert (await quotas.reserve(TENANT, 2, now)).admitted
        assert quotas.healthy
    finally:
        own_redis.resume()
        await quotas.close()


async def _in_flight(quotas: RedisQuotaStore) -> bool:
    return bool(quotas._inflight)


def _healthy_gauge(quotas: RedisQuotaStore) -> float:
    (family,) = [m for m in quota_metrics(quotas) if m.name == "edge_quota_redis_healthy"]
    return float(family.samples[0].value)


async def _zcard_is(raw: aioredis.Redis, key: str, n: int) -> bool:
    return int(await raw.zcard(key)) == n


async def _not_healthy(quotas: RedisQuotaStore) -> bool:
    return not quotas.healthy


class Unavailable(History):
    async def __call__(self, _tenant_id: str, _month: date) -> int:
        self.asked += 1
        raise TenantStoreUnavailable()


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_postgres_down_while_the_count_is_missing_is_a_503_not_a_refusal(
    own_redis: RedisServer, mode: str
) -> None:
    now = datetime.now(UTC)
    quotas = store(own_redis, Unavailable(), failure_mode=mode)
    await quotas.start()
    try:
        with pytest.raises(TenantStoreUnavailable) as raised:
            await quotas.reserve(TENANT, 10, now)
        assert raised.value.headers == {"Retry-After": "1"}
        with pytest.raises(TenantStoreUnavailable):
            await quotas.peek(TENANT, 10, now)
        assert quotas.healthy
        assert (quotas.counters.rebuilds, quotas.counters.degraded_refused) == (0, 0)
    finally:
        await quotas.close()
