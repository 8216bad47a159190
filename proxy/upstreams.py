"""Upstream pools: one keep-alive ``ClientSession`` per upstream, URLs taken round-robin.

The session is built once at start-up (DESIGN: nothing per request that start-up can do):
``auto_decompress=False`` so bodies pass through byte for byte with their ``Content-Encoding``;
cookies are never stored (``DummyCookieJar``: a shared jar would leak one client's cookies into
another's requests); proxy environment variables are ignored (``trust_env=False``).

``max_connections`` is enforced here, not only by aiohttp's connector: a request takes one of
the pool's slots before it contacts the upstream and keeps it until its answer is relayed. The
connector's own queue waits without a bound and cannot tell "pool full" from "slow connect";
this wait is bounded by ``connect_timeout_s`` and ends in 503 ``upstream_busy`` (CONTRACT §7),
and a request whose client has left gives its slot up at once (its task is cancelled).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from proxy.core.routes import RouteTable
from proxy.errors import UpstreamBusy
from proxy.settings import RouteSettings, Settings, UpstreamSettings

UPSTREAM_MAX_FIELD_BYTES = 16 * 1024


class UpstreamPool:
    __slots__ = (
        "_counter",
        "_session",
        "_slots",
        "in_flight",
        "name",
        "settings",
        "timeout",
        "urls",
        "waiting",
    )

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
        self._slots = asyncio.Semaphore(settings.max_connections)
        self.in_flight = 0  # requests holding a slot (for /metrics)
        self.waiting = 0  # requests waiting for one

    async def admit(self) -> None:
        """Take a slot for one request, waiting at most ``connect_timeout_s`` for one to free
        up; past that ``UpstreamBusy``. Every admitted request calls ``leave()`` once."""
        slots = self._slots
        if slots.locked():
            self.waiting += 1
            try:
                async with asyncio.timeout(self.settings.connect_timeout_s):
                    await slots.acquire()
            except TimeoutError:
                raise UpstreamBusy() from None
            finally:
                self.waiting -= 1
        else:
            await slots.acquire()  # a free slot: returns without suspending
        self.in_flight += 1

    @property
    def full(self) -> bool:
        """Every slot is taken: ``admit`` would wait."""
        return self._slots.locked()

    def leave(self) -> None:
        self.in_flight -= 1
        self._slots.release()

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


@dataclass(frozen=True, slots=True)
class RoutingSnapshot:
    """One configuration's routes and the pools they name: a route is always looked up in the
    ``pools`` of the snapshot it came from, so every upstream it names is there."""

    table: RouteTable[RouteSettings]
    pools: Mapping[str, UpstreamPool]


class Routing:
    """The route table and upstream pools in force; replaced whole, as one snapshot, on SIGHUP.

    A request takes ``current`` once (the route stage) and uses that snapshot to the end, so it
    finishes on the configuration it started with: a reload that renames or removes its
    upstream in between changes nothing for it. Pools of upstreams whose settings did not
    change are carried over (their keep-alive connections too); pools no longer needed are
    closed after ``grace_s``, by which time requests that were using them have finished (the
    shutdown grace is the same bound).
    """

    def __init__(self, settings: Settings) -> None:
        self.current = RoutingSnapshot(RouteTable(settings.routes), build_pools(settings.upstreams))
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def table(self) -> RouteTable[RouteSettings]:
        return self.current.table

    @property
    def pools(self) -> Mapping[str, UpstreamPool]:
        return self.current.pools

    def reload(self, settings: Settings, grace_s: float) -> None:
        pools: dict[str, UpstreamPool] = {}
        for name, up in settings.upstreams.items():
            old = self.pools.get(name)
            pools[name] = old if old is not None and old.settings == up else UpstreamPool(up)
        retired = [p for name, p in self.pools.items() if pools.get(name) is not p]
        self.current = RoutingSnapshot(RouteTable(settings.routes), pools)
        if retired:
            task = asyncio.ensure_future(self._retire(retired, grace_s))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _retire(pools: list[UpstreamPool], grace_s: float) -> None:
        try:
            await asyncio.sleep(grace_s)
        finally:  # also when close() cuts the grace short: no session is left open
            await asyncio.gather(*(p.close() for p in pools))

    async def close(self) -> None:
        retiring = list(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        await asyncio.gather(*(p.close() for p in self.pools.values()))
