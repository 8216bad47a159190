"""The known-over-limit short-cut of RedisBucketStore stays bounded: rotating buckets (anonymous
clients on ever new addresses) cannot grow it for ever, and an entry whose time has come is gone.
What it decides is unchanged: only rejections, for as long as no token can exist."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.stores.redis import RedisBucketStore


class RejectingClient:
    """Every check rejected with an empty bucket, as the script answers an exhausted one."""

    def __init__(self) -> None:
        self.calls = 0

    async def start(self) -> None:
        pass

    def run(self, keys: list[str], args: list[int]) -> asyncio.Future[Any]:
        self.calls += 1
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        reply.set_result([0, b"0"] * len(keys))
        return reply

    async def ping(self) -> None:
        pass

    def reset(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def store(client: RejectingClient, clock: Clock, max_limited: int) -> RedisBucketStore:
    return RedisBucketStore(
        client,
        cluster=False,
        deadline_s=1.0,
        failure_mode="closed",
        clock=clock,
        max_limited=max_limited,
    )


async def test_rotating_buckets_never_hold_more_than_the_bound() -> None:
    client, clock = RejectingClient(), Clock()
    s = store(client, clock, max_limited=100)
    try:
        for i in range(1_000):  # 1,000 anonymous addresses, each over its limit once
            assert not (await s.take(f"ip:198.51.{i // 256}.{i % 256}", 60)).allowed
        assert s.shortcut_entries == 100
        # The newest ones are still short-cut: no Redis call for them.
        calls = client.calls
        assert not (await s.take("ip:198.51.3.231", 60)).allowed
        assert client.calls == calls and s.shortcut_rejections == 1
    finally:
        await s.close()


async def test_an_entry_leaves_once_a_token_can_exist_again() -> None:
    client, clock = RejectingClient(), Clock()
    s = store(client, clock, max_limited=100)
    try:
        for i in range(50):
            await s.take(f"ip:{i}", 60)  # 60 rpm, empty: a token again in 1 s
        assert s.shortcut_entries == 50
        clock.now += 1.5
        await s.take("ip:new", 60)
        assert s.shortcut_entries == 1  # the 50 expired ones went, without a lookup of each
        calls = client.calls
        assert not (await s.take("ip:0", 60)).allowed
        assert client.calls == calls + 1  # asked Redis again: the short-cut had expired
    finally:
        await s.close()
