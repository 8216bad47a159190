"""The Redis render-quota store against a real Redis (CONTRACT §13): leases of a process that
died, Redis unreachable under both failure modes, and the units kept meanwhile."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from proxy.core.quota import month_id
from proxy.errors import RateLimiterUnavailable
from proxy.stores.quota import QUOTA_SCRIPT, RedisQuotaStore, quota_keys
from proxy.stores.redis import make_client
from tests.e2e.support import within
from tests.servers import RedisServer

TENANT = "eeeeeeee-0000-0000-0000-000000000001"
DEADLINE_S = 1.0  # generous: a call missing it on a busy machine would trip the breaker


class History:
    """The month's renders_started as Postgres would report it."""

    def __init__(self, renders: int = 0) -> None:
        self.renders = renders
        self.asked = 0

    async def __call__(self, _tenant_id: str, _month: date) -> int:
        self.asked += 1
        return self.renders


def store(redis: RedisServer, history: History, **options: object) -> RedisQuotaStore:
    client = make_client(redis.url, "standalone", None, DEADLINE_S, QUOTA_SCRIPT)
    return RedisQuotaStore(
        client,
        rebuild=history,
        deadline_s=DEADLINE_S,
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
        count_key, held_key = quota_keys(TENANT, month_id(now))
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
