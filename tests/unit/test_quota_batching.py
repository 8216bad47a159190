"""The Redis quota store sends the operations of one event-loop turn as one script call (per
tenant in cluster mode), like the limiter's checks. A fake script client counts the calls."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from proxy.core.quota import month_id
from proxy.stores.quota import RedisQuotaStore, no_history

NOW = datetime(2026, 12, 7, tzinfo=UTC)


class CountingClient:
    """Admits everything: 3 integers per operation (7 arguments each)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def start(self) -> None:
        pass

    def run(self, keys: list[str], args: list[int]) -> asyncio.Future[Any]:
        self.calls.append(keys)
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        reply.set_result([1, 0, 1] * (len(args) // 7))
        return reply

    async def ping(self) -> None:
        pass

    def reset(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def store(client: CountingClient, cluster: bool) -> RedisQuotaStore:
    return RedisQuotaStore(
        client, cluster=cluster, rebuild=no_history, deadline_s=1.0, failure_mode="closed"
    )


async def test_one_call_per_turn_in_standalone_mode() -> None:
    client = CountingClient()
    quotas = store(client, cluster=False)
    tenants = [f"t{i % 3}" for i in range(12)]
    decisions = await asyncio.gather(*(quotas.reserve(t, 100, NOW) for t in tenants))
    assert all(d.admitted for d in decisions)
    assert len(client.calls) == 1 and len(client.calls[0]) == 3 * len(tenants)
    for t, d in zip(tenants, decisions, strict=True):  # settlements of one turn: one call too
        quotas.settle(t, month_id(NOW), d.reservation, True)
    await quotas.close()
    assert len(client.calls) == 2


async def test_one_call_per_tenant_in_cluster_mode() -> None:
    client = CountingClient()
    quotas = store(client, cluster=True)
    tenants = [f"t{i % 3}" for i in range(12)]
    await asyncio.gather(*(quotas.reserve(t, 100, NOW) for t in tenants))
    assert len(client.calls) == 3
    for keys in client.calls:  # each call's keys share one hash tag
        assert len({k.split("{", 1)[1].split("}", 1)[0] for k in keys}) == 1
    await quotas.close()
