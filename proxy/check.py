"""The stores half of ``python -m proxy check`` (CONTRACT §10), the ``nginx -t`` of the proxy.

The configuration half is ``serve``'s own validation (``load_settings`` and ``build_stores``,
called by the CLI for both commands). Here: with ``DATABASE_URL``, every migration of ``sql/``
is applied and unedited (``migrate``'s own checksums); with ``REDIS_URL``, Redis answers the
limiter's first call, made with the limiter's own client for the configured topology. Nothing
is written and no listener is opened. Each problem is one line; a store that does not answer
is one within ``tenancy.store_timeout_s`` + ``PROBE_MARGIN_S``, so the whole command ends
within the contract's ``store_timeout_s`` + 5 s (the margin leaves room for starting Python
and for closing a connection to a server that stopped answering mid-call).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from urllib.parse import urlsplit

from proxy.migrate import MigrationError, describe_dsn, migration_problems
from proxy.settings import Settings
from proxy.stores.redis import make_client

PROBE_MARGIN_S = 2.0


async def store_problems(settings: Settings) -> list[str]:
    """One line per problem of the stores ``settings`` names; both are asked at once."""
    deadline = settings.tenancy.store_timeout_s + PROBE_MARGIN_S
    probes: list[Awaitable[list[str]]] = []
    if settings.database_url is not None:
        where = f"database {describe_dsn(settings.database_url)}"
        probes.append(_bounded(where, _database(settings.database_url, deadline), deadline))
    if settings.redis_url is not None:
        where = f"REDIS_URL: {_redis_address(settings)}"
        probes.append(_bounded(where, _redis(settings, deadline), deadline))
    found = await asyncio.gather(*probes)
    return [line for lines in found for line in lines]


async def _bounded(where: str, probe: Awaitable[list[str]], deadline: float) -> list[str]:
    try:
        async with asyncio.timeout(deadline):
            return await probe
    except TimeoutError:
        return [f"{where}: no answer within {deadline:g}s"]


async def _database(dsn: str, deadline: float) -> list[str]:
    try:
        return await migration_problems(dsn, timeout=deadline)
    except MigrationError as e:
        return [str(e)]


async def _redis(settings: Settings, deadline: float) -> list[str]:
    assert settings.redis_url is not None
    client = make_client(
        settings.redis_url, settings.redis_mode, settings.redis_sentinel_service, deadline
    )
    try:
        # What the limiter does before its first request: connect (through the sentinel or
        # the cluster's slot map), authenticate, select the database, load its script.
        await client.start()
    except Exception as e:  # every failure of the dependency is the answer, whatever its type
        reason = " ".join(str(e).split()) or type(e).__name__
        return [f"REDIS_URL: {_redis_address(settings)} does not answer: {reason}"]
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
    return []


def _redis_address(settings: Settings) -> str:
    """Where Redis was asked, never the password."""
    parts = urlsplit(settings.redis_url or "")
    if settings.redis_mode == "sentinel":
        master = settings.redis_sentinel_service
        return f"sentinel {parts.hostname}:{parts.port or 26379} (master {master})"
    address = f"{parts.hostname}:{parts.port or 6379}"
    return f"cluster node {address}" if settings.redis_mode == "cluster" else address
