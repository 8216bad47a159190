"""Session-wide throwaway servers (see tests/servers.py); nothing else belongs in this file.

The servers start lazily, the first time a test asks for them, and once per session: tests that
need neither never pay for an initdb. A test that stops or kills a server starts it again before
it ends (in a ``finally``), because the next test gets the same server.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from proxy.migrate import apply_migrations

try:  # tests/ is a package, so pytest put the rootdir on sys.path...
    from tests.dnsserver import LoopbackDns
    from tests.servers import PostgresServer, RedisClusterServer, RedisSentinelSet, RedisServer
except ModuleNotFoundError:  # ...or it is not, and pytest put tests/ itself there
    from dnsserver import LoopbackDns  # type: ignore[no-redef,import-not-found]
    from servers import (  # type: ignore[no-redef,import-not-found]
        PostgresServer,
        RedisClusterServer,
        RedisSentinelSet,
        RedisServer,
    )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway Postgres for the whole session: ``.dsn``, ``.create_database()``, stop/start."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A throwaway Redis for the whole session: ``.url``, stop/start/kill/pause."""
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServer]:
    """A throwaway 3-master Redis Cluster for the whole session: ``.url``, ``.nodes``,
    ``start(i)``/``stop(i)``/``kill_node(i)``. A test that takes a node down calls
    ``astart()`` in a ``finally`` (it waits until the cluster is healthy again)."""
    cluster = RedisClusterServer()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelSet]:
    """A throwaway master + replica + sentinel (service ``edge-master``) for the whole session:
    ``.sentinel_url``, ``.master_port``, ``kill_master()``, ``wait_for_failover()``. A test that
    fails the master over calls ``aheal()`` in a ``finally``: the roles stay swapped, but the
    next test again gets a master with a synced replica behind one sentinel."""
    sentinel_set = RedisSentinelSet()
    try:
        sentinel_set.start()
        yield sentinel_set
    finally:
        sentinel_set.cleanup()


@pytest_asyncio.fixture
async def migrated_dsn(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """DSN of a fresh database with every migration of sql/ applied; dropped afterwards."""
    name = f"edge_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    await postgres_server.astart()  # no-op when running; heals after a test that left it down
    dsn = await asyncio.to_thread(postgres_server.create_database, name)
    try:
        await apply_migrations(dsn)
        yield dsn
    finally:
        await postgres_server.astart()
        await asyncio.to_thread(postgres_server.drop_database, name)


@pytest.fixture(scope="session")
def dns_server() -> Iterator[LoopbackDns]:
    """A loopback authoritative DNS server for the whole session (``tests/dnsserver.py``):
    ``.address`` for ``domains.nameservers``, ``.set(name, type, *values)``, ``.count(...)``."""
    server = LoopbackDns().start()
    try:
        yield server
    finally:
        server.stop()
