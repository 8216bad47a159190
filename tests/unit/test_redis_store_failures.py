"""How RedisBucketStore maps a client that fails in unusual ways: every check is answered (in
the failure mode), never left waiting. Real Redis behaviour is in tests/e2e; these drive the
store's own error paths with a client that fails on purpose."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.errors import RateLimiterUnavailable
from proxy.stores.redis import RedisBucketStore


class FailingClient:
    """``run`` raises, or returns the future the test settles."""

    def __init__(self, reply: asyncio.Future[Any] | None = None) -> None:
        self.reply = reply
        self.resets = 0

    async def start(self) -> None:
        pass

    def run(self, keys: list[str], args: list[int]) -> asyncio.Future[Any]:
        if self.reply is None:
            raise RuntimeError("handle is closed")  # what uvloop says for a dead transport
        return self.reply

    async def ping(self) -> None:
        raise ConnectionError("still down")

    def reset(self) -> None:
        self.resets += 1

    async def aclose(self) -> None:
        pass


def store(client: FailingClient, mode: str) -> RedisBucketStore:
    return RedisBucketStore(client, cluster=False, deadline_s=0.5, failure_mode=mode)


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_a_client_that_raises_is_answered_in_the_failure_mode(mode: str) -> None:
    client = FailingClient()
    s = store(client, mode)
    try:
        if mode == "open":
            decision = await asyncio.wait_for(s.take("key:a", 60), 2)
            assert decision.allowed and s.degraded_decisions == 1
        else:
            with pytest.raises(RateLimiterUnavailable):
                await asyncio.wait_for(s.take("key:a", 60), 2)
        assert not s.healthy and client.resets == 1
    finally:
        await s.close()


@pytest.mark.parametrize("reply", [[b"garbage"], b"OK", [1, b"not a number"], None])
async def test_a_reply_that_is_not_the_scripts_decides_nothing(reply: object) -> None:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(reply)
    s = store(FailingClient(future), "closed")
    try:
        with pytest.raises(RateLimiterUnavailable):
            await asyncio.wait_for(s.take("key:a", 60), 2)
        assert not s.healthy
    finally:
        await s.close()


async def test_no_probe_outlives_close() -> None:
    """A call that fails while close() waits for it must not start a probe nobody stops."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    s = store(FailingClient(future), "open")
    taking = asyncio.create_task(s.take("key:a", 60))
    await asyncio.sleep(0)  # the batch goes out
    await asyncio.sleep(0)
    closing = asyncio.create_task(s.close())
    await asyncio.sleep(0)
    future.set_exception(ConnectionError("reset"))
    await closing
    assert (await taking).allowed  # answered, degraded
    probes = [t for t in asyncio.all_tasks() if "probe" in t.get_name()]
    assert probes == []
