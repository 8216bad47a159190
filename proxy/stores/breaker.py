"""The circuit breaker both Redis stores share (the limiter's buckets and the render quota).

A failed call opens it; while it is open the store answers from its degraded mode (fail-open)
or refuses (fail-closed), and a ``RecoveryProbe`` pings until Redis answers, then closes it. The
state is a plain attribute (``_open``) because the stores read it on every request."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from proxy.background import RecoveryProbe


class RedisBreaker:
    """Mixed into a Redis store: ``_init_breaker`` in its constructor, ``_trip`` on a failure,
    ``_stop_breaker`` in its ``close``. ``_on_trip``/``_on_recovery`` are its own hooks."""

    _log: logging.Logger
    _what: str  # what the store does: "rate limiting", "render quota"
    _open_as: str  # what it does while open and failing open
    _open: bool
    _closing: bool
    _fail_open: bool
    _probe: RecoveryProbe

    def _init_breaker(
        self,
        name: str,
        failure_mode: str,
        interval_s: float,
        ping: Callable[[], Awaitable[None]],
        reset: Callable[[], None],
    ) -> None:
        self._fail_open = failure_mode == "open"
        self._open = False
        self._closing = False
        self._probe = RecoveryProbe(name, interval_s, ping, recovered=self._recovered, failed=reset)

    @property
    def healthy(self) -> bool:
        return not self._open

    async def ready(self) -> bool:
        """Fail-open is a degraded mode that covers an outage; fail-closed is not."""
        return self._fail_open or not self._open

    def _on_trip(self) -> None:
        """What the store forgets when the breaker opens."""

    def _on_recovery(self) -> None:
        """What the store forgets when Redis answers again."""

    def _trip(self, error: BaseException) -> None:
        if self._open:
            return
        self._open = True
        self._on_trip()
        if self._closing:  # no probe outlives close()
            return
        self._log.error(
            "redis unavailable (%s): %s %s",
            type(error).__name__,
            self._what,
            self._open_as if self._fail_open else "refuses requests (503)",
        )
        self._probe.start()

    def _recovered(self) -> None:
        self._open = False
        self._on_recovery()
        self._log.warning("redis answers again: %s exact again", self._what)

    async def _stop_breaker(self) -> None:
        self._closing = True
        await self._probe.stop()
