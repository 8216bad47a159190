"""The verifier as ``serve`` runs it, and the checker ``domains check`` uses: built from the
``[domains]`` settings, with their own HTTP session and resolver."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import aiohttp

from proxy.background import Job
from proxy.domains.checks import TIMEOUT_S, Checker
from proxy.domains.resolver import DnsResolver
from proxy.domains.verifier import CONCURRENCY, DomainVerifier
from proxy.settings import DomainsSettings, Settings
from proxy.telemetry import Telemetry
from proxy.webhooks.destinations import Policy


@contextlib.asynccontextmanager
async def open_checker(domains: DomainsSettings) -> AsyncIterator[Checker]:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=CONCURRENCY, force_close=True),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    )
    try:
        yield Checker(
            session,
            DnsResolver(domains.nameservers, TIMEOUT_S),
            domains.http_port,
            policy=Policy(allow_http=True, allow_networks=domains.allow_networks),
        )
    finally:
        await session.close()


class RunningVerifier:
    def __init__(self, verifier: DomainVerifier, stack: contextlib.AsyncExitStack) -> None:
        self.verifier = verifier
        self._stack = stack

    async def close(self) -> None:
        await self.verifier.stop()
        await self._stack.aclose()


async def start_verifier(
    settings: Settings, telemetry: Telemetry, clock: Callable[[], datetime], jobs: list[Job]
) -> RunningVerifier | None:
    """The verifier of this process, running; None unless database mode and ``domains.verify``.
    It joins ``jobs``, whose failures ``edge_background_job_failures`` counts."""
    if settings.database_url is None or not settings.domains.verify:
        return None
    stack = contextlib.AsyncExitStack()
    checker = await stack.enter_async_context(open_checker(settings.domains))
    verifier = DomainVerifier(
        settings.database_url, checker, clock, settings.tenancy.platform_domains
    )
    telemetry.collect_from(verifier.metrics)
    jobs.append(verifier)
    verifier.start()
    return RunningVerifier(verifier, stack)
