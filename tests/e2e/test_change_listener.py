"""The LISTEN connection (stores.postgres.ChangeListener) against real Postgres: it is a job on
the common base, so an unexpected exception no longer ends it for good (changes would then stop
reaching this proxy without a word); it is logged, counted, and listening starts again."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from proxy.stores.postgres import ChangeListener
from tests.servers import PostgresServer

WAIT = 10.0  # a bound on the test, never a synchronisation


@pytest.fixture
def dsn(postgres_server: PostgresServer) -> Iterator[str]:
    name = f"listener_{uuid.uuid4().hex[:10]}"
    yield postgres_server.create_database(name)
    postgres_server.drop_database(name)


async def test_a_bug_in_a_callback_restarts_listening_instead_of_ending_it(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    reconnects = 0
    changes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def on_reconnect() -> None:
        nonlocal reconnects
        reconnects += 1
        if reconnects == 1:
            raise RuntimeError("a bug in the flush")

    listener = ChangeListener(
        dsn, changes.put_nowait, on_reconnect, timeout_s=2.0, channel="edge_test_changes"
    )
    listener.start()
    try:
        await asyncio.wait_for(listener.connected.wait(), WAIT)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("""NOTIFY edge_test_changes, '{"tenant": "t1"}'""")
        finally:
            await conn.close()
        assert await asyncio.wait_for(changes.get(), WAIT) == {"tenant": "t1"}
        assert (reconnects, listener.failures) == (2, 1)
        assert "a bug in the flush" in caplog.text
    finally:
        await asyncio.wait_for(listener.close(), WAIT)
    assert not listener.running and not listener.connected.is_set()
