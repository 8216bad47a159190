"""Upstream pools: one keep-alive ``ClientSession`` per upstream, URLs taken round-robin.

The session is built once at start-up (DESIGN: nothing per request that start-up can do):
``auto_decompress=False`` so bodies pass through byte for byte with their ``Content-Encoding``;
cookies are never stored (``DummyCookieJar``: a shared jar would leak one client's cookies into
another's requests); proxy environment variables are ignored (``trust_env=False``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import aiohttp

from proxy.settings import UpstreamSettings


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
