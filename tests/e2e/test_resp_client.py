"""The limiter's pipelined RESP client (proxy/stores/resp.py) against a real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from proxy.stores.redis import BATCH_SCRIPT, PipelinedScriptClient, bucket_key
from proxy.stores.resp import PipelinedRedis, RespError, pack, parse_url
from tests.procs import free_port
from tests.servers import RedisServer


@pytest_asyncio.fixture
async def admin(own_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    yield client
    await client.aclose()


async def clients(admin: aioredis.Redis, name: str) -> int:
    listed = await admin.client_list()
    return sum(1 for c in listed if c["name"] == name)


def test_pack_is_a_resp_array_of_bulk_strings() -> None:
    assert pack("SET", b"k\r\n", 12) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n"


def test_parse_url_reads_credentials_database_and_tls() -> None:
    host, port, options = parse_url("rediss://edge:p%40ss@cache.internal:6380/3")
    assert (host, port) == ("cache.internal", 6380)
    assert options["username"] == "edge" and options["password"] == "p@ss"
    assert options["db"] == 3 and isinstance(options["tls"], ssl.SSLContext)
    host, port, options = parse_url("redis://:secret@127.0.0.1")
    assert (host, port, options["username"], options["password"]) == (
        "127.0.0.1",
        6379,
        None,
        "secret",
    )
    assert options["db"] == 0 and options["tls"] is None


async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(
    own_redis: RedisServer, admin: aioredis.Redis
) -> None:
    redis = PipelinedRedis.from_url(own_redis.url, connect_timeout_s=2)
    try:
        await redis.call("CLIENT", "SETNAME", "pipelined")
        # All sent before any reply is read: each future must get the reply to its command.
        futures = [redis.call("INCRBY", "n", i) for i in range(1, 501)]
        replies = await asyncio.gather(*futures)
        assert replies == [i * (i + 1) // 2 for i in range(1, 501)]
        assert await clients(admin, "pipelined") == 1
    finally:
        await redis.aclose()


async def test_an_error_reply_fails_its_call_only(own_redis: RedisServer) -> None:
    redis = PipelinedRedis.from_url(own_redis.url, connect_timeout_s=2)
    try:
        bad, good = redis.call("INCR"), redis.call("PING")
        with pytest.raises(RespError, match="wrong number of arguments"):
            await bad
        assert await good == b"PONG"
    finally:
        await redis.aclose()


async def test_a_call_given_up_does_not_shift_the_replies_after_it(
    own_redis: RedisServer, admin: aioredis.Redis
) -> None:
    await admin.mset({"x": "1", "y": "2"})
    redis = PipelinedRedis.from_url(own_redis.url, connect_timeout_s=2)
    try:
        await redis.call("PING")
        abandoned = redis.call("GET", "x")
        abandoned.cancel()  # its deadline passed, say: the reply still comes and is dropped
        assert await redis.call("GET", "y") == b"2"
        assert await redis.call("GET", "x") == b"1"
    finally:
        await redis.aclose()


async def test_auth_and_database_from_the_url(
    own_redis: RedisServer, admin: aioredis.Redis
) -> None:
    await admin.config_set("requirepass", "s3cret")
    port = own_redis.port
    try:
        redis = PipelinedRedis.from_url(f"redis://:s3cret@127.0.0.1:{port}/5", connect_timeout_s=2)
        try:
            assert await redis.call("SET", "in-five", "yes") == b"OK"
        finally:
            await redis.aclose()
        check = aioredis.Redis(port=port, password="s3cret", db=5, decode_responses=True)
        try:
            assert await check.get("in-five") == "yes"
        finally:
            await check.aclose()
        wrong = PipelinedRedis.from_url(f"redis://:nope@127.0.0.1:{port}/0", connect_timeout_s=2)
        try:
            # The refused AUTH fails the calls that waited for the connection; none ran.
            with pytest.raises(ConnectionError, match=r"WRONGPASS|invalid password"):
                await wrong.call("SET", "ran", "1")
        finally:
            await wrong.aclose()
    finally:
        await admin.execute_command("AUTH", "s3cret")
        await admin.config_set("requirepass", "")
    assert await admin.exists("ran") == 0


async def test_a_killed_connection_fails_its_calls_and_the_next_call_reconnects(
    own_redis: RedisServer, admin: aioredis.Redis
) -> None:
    redis = PipelinedRedis.from_url(own_redis.url, connect_timeout_s=2)
    try:
        await redis.call("CLIENT", "SETNAME", "victim")
        waiting = redis.call("BLPOP", "never", 0)  # answered only when the connection dies
        await asyncio.sleep(0)  # let the command leave
        assert await admin.execute_command("CLIENT", "KILL", "SKIPME", "yes") >= 1
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(waiting, 5)
        assert await redis.call("PING") == b"PONG"
    finally:
        await redis.aclose()


async def test_an_unreachable_redis_fails_calls_promptly() -> None:
    redis = PipelinedRedis.from_url(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=2)
    try:
        with pytest.raises(ConnectionError, match="cannot connect"):
            await asyncio.wait_for(redis.call("PING"), 2)
    finally:
        await redis.aclose()


async def test_black_holed_redis_leaves_the_deadline_to_the_caller(
    own_redis: RedisServer,
) -> None:
    redis = PipelinedRedis.from_url(own_redis.url, connect_timeout_s=2)
    try:
        await redis.call("PING")
        assert own_redis.pid is not None
        os.kill(own_redis.pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(redis.call("PING"), 0.3)
            redis.reset()  # what the store does after a missed deadline
        finally:
            os.kill(own_redis.pid, signal.SIGCONT)
        assert await asyncio.wait_for(redis.call("PING"), 5) == b"PONG"
    finally:
        await redis.aclose()


async def test_script_client_falls_back_to_eval_when_the_script_cache_is_empty(
    own_redis: RedisServer, admin: aioredis.Redis
) -> None:
    client = PipelinedScriptClient(PipelinedRedis.from_url(own_redis.url, connect_timeout_s=2))
    try:
        await client.start()
        first = await client.run([bucket_key("a")], [10])
        await admin.script_flush()  # what a Redis restart or failover does to the cache
        second = await client.run([bucket_key("a")], [10])
        assert (first[0], second[0]) == (1, 1)
        assert float(second[1]) < float(first[1])  # the same bucket, one more token gone
        assert (await admin.script_exists(client.sha)) == [True]  # EVAL cached it again
    finally:
        await client.aclose()
    assert client.sha == _sha1(BATCH_SCRIPT)


def _sha1(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()


async def test_a_redis_that_refuses_after_the_accept_does_not_leave_a_dead_connection(
    own_redis: RedisServer,
) -> None:
    """Redis at maxclients (or in protected mode) accepts, sends an error and closes: the call
    fails, and the next one connects afresh instead of writing to the dead connection."""
    refused = 0

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal refused
        refused += 1
        writer.write(b"-ERR max number of clients reached\r\n")
        writer.close()

    fake = await asyncio.start_server(refuse, "127.0.0.1", 0)
    fake_port = fake.sockets[0].getsockname()[1]
    targets = [("127.0.0.1", fake_port), ("127.0.0.1", own_redis.port)]

    async def address() -> tuple[str, int]:
        return targets.pop(0) if len(targets) > 1 else targets[0]

    redis = PipelinedRedis(address, connect_timeout_s=2)
    try:
        with pytest.raises((ConnectionError, RespError)):
            await asyncio.wait_for(redis.call("PING"), 5)
        assert refused == 1
        # A call may still meet the dying connection; within a few it must be a fresh one.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while True:
            try:
                assert await asyncio.wait_for(redis.call("PING"), 5) == b"PONG"
                break
            except ConnectionError:
                assert loop.time() < deadline
                await asyncio.sleep(0.01)
    finally:
        await redis.aclose()
        fake.close()
        await fake.wait_closed()


async def test_a_script_call_abandoned_while_connecting_is_never_sent(
    own_redis: RedisServer, admin: aioredis.Redis
) -> None:
    """Its deadline passed before the connection was up: the request was answered without
    Redis (degraded or 503), so Redis must not take a token for it afterwards."""
    connect = asyncio.Event()

    async def slow_address() -> tuple[str, int]:
        await connect.wait()
        return "127.0.0.1", own_redis.port

    await admin.script_load(BATCH_SCRIPT)  # EVALSHA would run at once
    client = PipelinedScriptClient(PipelinedRedis(slow_address, connect_timeout_s=5))
    try:
        reply = client.run([bucket_key("abandoned")], [10])
        reply.cancel()  # what the store's deadline timer does
        connect.set()
        assert await asyncio.wait_for(client._redis.call("PING"), 5) == b"PONG"
        assert await admin.exists(bucket_key("abandoned")) == 0
    finally:
        await client.aclose()
