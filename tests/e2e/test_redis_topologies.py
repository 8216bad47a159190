"""The Redis Cluster and Sentinel harnesses, driven by redis-py's asyncio clients."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from tests.servers import RedisClusterServer, RedisSentinelSet

FAILOVER_DEADLINE_S = 10.0
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, ReadOnlyError)


def keys_one_per_node(cluster: RedisClusterServer) -> dict[tuple[str, int], str]:
    """A key per node, each with its own hash tag, owned by that node (per ``CLUSTER SLOTS``)."""
    chosen: dict[tuple[str, int], str] = {}
    for n in range(10_000):
        key = f"{{tag{n}}}:probe"
        owner = cluster.node_for_slot(key_slot(key.encode()))
        chosen.setdefault(owner, key)
        if len(chosen) == len(cluster.nodes):
            return chosen
    raise AssertionError(f"hash tags never covered every node: {chosen}")


async def direct_get(address: tuple[str, int], key: str) -> str | None:
    """GET on one node with a plain (non-cluster) client: no redirects followed, and no retries
    (redis-py's default backoff would spend seconds on a dead node)."""
    client = aioredis.Redis(
        host=address[0], port=address[1], decode_responses=True, retry=Retry(NoBackoff(), 0)
    )
    try:
        value = await client.get(key)
        assert value is None or isinstance(value, str)
        return value
    finally:
        await client.aclose()


async def test_cluster_hash_tags_land_on_different_nodes(redis_cluster: RedisClusterServer) -> None:
    await redis_cluster.astart()  # no-op when healthy; heals after a test that left a node down
    chosen = await asyncio.to_thread(keys_one_per_node, redis_cluster)
    assert len(set(chosen)) == 3

    client = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    try:
        for key in chosen.values():
            assert await client.set(key, f"value-of-{key}")
        for key in chosen.values():
            assert await client.get(key) == f"value-of-{key}"
        routed = [client.get_node_from_key(key) for key in chosen.values()]
        assert {(n.host, n.port) for n in routed if n is not None} == set(redis_cluster.nodes)
    finally:
        await client.aclose()

    # Each key really lives on its owner only; the two other nodes redirect.
    for owner, key in chosen.items():
        for node in redis_cluster.nodes:
            if node == owner:
                assert await direct_get(node, key) == f"value-of-{key}"
            else:
                with pytest.raises(MovedError):
                    await direct_get(node, key)


async def test_cluster_node_kill_and_restart(redis_cluster: RedisClusterServer) -> None:
    await redis_cluster.astart()
    chosen = await asyncio.to_thread(keys_one_per_node, redis_cluster)
    victim = redis_cluster.nodes[1]
    key = chosen[victim]
    client = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    try:
        await client.set(key, "before")
        await redis_cluster.akill_node(1)
        assert not redis_cluster.servers[1].running
        with pytest.raises(RedisConnectionError):
            await direct_get(victim, key)

        await redis_cluster.astart(1)  # same port, same nodes.conf; waits until cluster ok
        assert redis_cluster.nodes[1] == victim
        assert await direct_get(victim, key) is None  # a real restart: no persistence
        assert await client.set(key, "after")
        assert await client.get(key) == "after"
    finally:
        await client.aclose()
        await redis_cluster.astart()


async def test_sentinel_master_for_set_get(redis_sentinel: RedisSentinelSet) -> None:
    await redis_sentinel.astart()
    host, port = redis_sentinel.sentinel_address
    sentinel = Sentinel([(host, port)], socket_timeout=2)  # type: ignore[no-untyped-call]
    master = sentinel.master_for(redis_sentinel.service, decode_responses=True)
    try:
        assert await sentinel.discover_master(redis_sentinel.service) == (
            "127.0.0.1",
            redis_sentinel.master_port,
        )
        assert await master.set("sentinel:probe", "hello")
        assert await master.get("sentinel:probe") == "hello"
    finally:
        await master.aclose()
        await sentinel.aclose()


async def test_sentinel_failover_promotes_replica(redis_sentinel: RedisSentinelSet) -> None:
    await redis_sentinel.astart()
    old_master, replica = redis_sentinel.master_port, redis_sentinel.replica_port
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        [redis_sentinel.sentinel_address], socket_timeout=0.5
    )
    master = sentinel.master_for(
        redis_sentinel.service, socket_connect_timeout=0.5, decode_responses=True
    )
    try:
        await master.set("failover:before", "kept")
        assert await master.execute_command("WAIT", 1, 400) == 1  # the replica has it

        await redis_sentinel.akill_master()
        started = time.monotonic()
        while True:  # the same client recovers once the sentinel names the new master
            try:
                await master.set("failover:after", "written")
                if await master.get("failover:after") == "written":
                    break
            except _TRANSIENT:
                if time.monotonic() - started > FAILOVER_DEADLINE_S:
                    raise
                await asyncio.sleep(0.05)

        assert await sentinel.discover_master(redis_sentinel.service) == ("127.0.0.1", replica)
        assert await redis_sentinel.await_failover() == ("127.0.0.1", replica)
        assert redis_sentinel.master_port == replica
        assert await master.get("failover:before") == "kept"  # promoted, not restarted
    finally:
        await master.aclose()
        await sentinel.aclose()
        await redis_sentinel.aheal()  # the old master rejoins as the new master's replica
    assert redis_sentinel.replica_port == old_master
