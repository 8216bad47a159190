"""The throwaway-server harness itself: stop, start on the same port, kill, pause."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from tests.servers import PostgresServer, RedisServer


async def pg_answers(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError):
        return False
    try:
        return bool(await conn.fetchval("SELECT 1") == 1)
    finally:
        await conn.close()


async def redis_answers(url: str, wait_s: float = 2) -> bool:
    client = aioredis.Redis.from_url(url, socket_timeout=wait_s, socket_connect_timeout=wait_s)
    try:
        return bool(await client.ping())
    except (RedisConnectionError, RedisTimeoutError):
        return False
    finally:
        await client.aclose()


async def test_postgres_stop_start_kill(postgres_server: PostgresServer) -> None:
    port, dsn = postgres_server.port, postgres_server.dsn
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE TABLE IF NOT EXISTS harness_probe (x int)")
    await conn.execute("INSERT INTO harness_probe VALUES (1)")
    try:
        await postgres_server.astop()
        assert not postgres_server.running
        assert not await pg_answers(dsn)
        with pytest.raises((OSError, asyncpg.InterfaceError, asyncpg.PostgresError)):
            await conn.fetchval("SELECT 1")  # the open connection was cut by the shutdown
        await conn.close()

        await postgres_server.astart()
        assert postgres_server.port == port
        assert await pg_answers(dsn)
        conn = await asyncpg.connect(dsn)
        assert await conn.fetchval("SELECT count(*) FROM harness_probe") >= 1  # same data dir
        await conn.close()

        await postgres_server.akill()
        assert not await pg_answers(dsn)
        await postgres_server.astart()  # crash recovery on the same data dir
        assert await pg_answers(dsn)
    finally:
        conn.terminate()
        await postgres_server.astart()
        cleanup = await asyncpg.connect(dsn)
        await cleanup.execute("DROP TABLE IF EXISTS harness_probe")
        await cleanup.close()


async def test_redis_stop_start_kill_pause(redis_server: RedisServer) -> None:
    port, url = redis_server.port, redis_server.url
    try:
        assert await redis_answers(url)

        await redis_server.astop()
        assert not await redis_answers(url)
        await redis_server.astart()
        assert redis_server.port == port
        assert await redis_answers(url)

        await redis_server.akill()
        assert not await redis_answers(url)
        await redis_server.astart()
        assert await redis_answers(url)

        redis_server.pause()  # accepts connections, never answers
        assert not await redis_answers(url, wait_s=0.3)
        redis_server.resume()
        assert await redis_answers(url)
    finally:
        redis_server.resume()
        await redis_server.astart()
