"""Upstream pools: one keep-alive ``ClientSession`` per upstream, URLs taken round-robin.

The session is built once at start-up (DESIGN: nothing per request that start-up can do):
``auto_decompress=False`` so bodies pass through byte for byte with their ``Content-Encoding``;
cookies are never stored (``DummyCookieJar``: a shared jar would leak one client's cookies into
another's requests); proxy environment variables are ignored (``trust_env=False``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping

import aiohttp

from proxy.core.routes import RouteTable
from proxy.settings import RouteSettings, Settings, UpstreamSettings

UPSTREAM_MAX_FIELD_BYTES = 16 * 1024


class UpstreamPool:
    __slots__ = ("_counter", "_session", "name", "settings", "timeout", "urls")

    def __init__(self, settings: UpstreamSettings) -> None:
        self.name = settings.name
        self.settings = settings
        self.urls = settings.urls
        self._counter = itertools.count()
        # sock_read bounds the wait for the response head and every gap between body chunks;
        # total stays unbounded because a multi-GB download may legitimately take hours.
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None,
            sock_connect=settings.connect_timeout_s,
            sock_read=settings.read_timeout_s,
        )
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.settings.max_connections,
                    limit_per_host=0,
                    enable_cleanup_closed=False,
                    ttl_dns_cache=60,
                ),
                timeout=self.timeout,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                # An upstream's response head is bounded too (issue 9): past these, the
                # response is refused (502) instead of held in memory. 16 KiB per line and per
                # field leaves room for long Link/CSP headers; aiohttp's 128-field cap stays.
                max_line_size=UPSTREAM_MAX_FIELD_BYTES,
                max_field_size=UPSTREAM_MAX_FIELD_BYTES,
            )
        return self._session

    def rotation(self) -> tuple[str, ...]:
        """Every URL once, starting at the next one in round-robin order."""
        n = len(self.urls)
        if n == 1:
            return self.urls
        start = next(self._counter) % n
        return self.urls[start:] + self.urls[:start]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def build_pools(upstreams: Mapping[str, UpstreamSettings]) -> dict[str, UpstreamPool]:
    return {name: UpstreamPool(s) for name, s in upstreams.items()}


class Routing:
    """The route table and upstream pools in force; replaced whole on SIGHUP.

    A request reads ``table`` and ``pools`` once, so it finishes on the configuration it
    started with. Pools of upstreams whose settings did not change are carried over (their
    keep-alive connections too); pools no longer needed are closed after ``grace_s``, by which
    time requests that were using them have finished (the shutdown grace is the same bound).
    """

    def __init__(self, settings: Settings) -> None:
        self.table: RouteTable[RouteSettings] = RouteTable(settings.routes)
        self.pools: dict[str, UpstreamPool] = build_pools(settings.upstreams)
        self._retiring: set[asyncio.Task[None]] = set()

    def reload(self, settings: Settings, grace_s: float) -> None:
        pools: dict[str, UpstreamPool] = {}
        for name, up in settings.upstreams.items():
            old = self.pools.get(name)
            pools[name] = old if old is not None and old.settings == up else UpstreamPool(up)
        retired = [p for name, p in self.pools.items() if pools.get(name) is not p]
        self.table, self.pools = RouteTable(settings.routes), pools
        if retired:
            task = asyncio.ensure_future(self._retire(retired, grace_s))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _retire(pools: list[UpstreamPool], grace_s: float) -> None:
        await asyncio.sleep(grace_s)
        await asyncio.gather(*(p.close() for p in pools))

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*(p.close() for p in self.pools.values()))
