"""Background jobs have one shape (DESIGN.md): started with the app, run until stopped, hand back
what they hold on stop, and never die silently on an unexpected exception.

``Job`` is that shape. A job implements ``run`` (its loop) and, if it holds something, ``finish``;
the base gives it the rest: ``start``/``stop``, a stop event, and a supervisor that restarts
``run`` after an unexpected exception, having logged it and counted it in ``failures``, with
capped exponential backoff and jitter (``core.backoff``). ``stop`` never cancels a round in the
middle: it sets the stop event, lets the current round end (cancelling only past
``stop_timeout_s``, for a round that hangs), then calls ``finish``.

A job of its own::

    class Sweeper(Job):
        def __init__(self, store: SweepStore) -> None:
            super().__init__("sweeper")
            self._store = store

        async def run(self) -> None:
            while not await self.sleep(60):  # True as soon as stop() is called
                await self._store.sweep_once()  # an exception here: logged, counted, restarted
                self.succeeded()  # a healthy round: the next failure backs off from the start

        async def finish(self) -> None:  # after the loop ended, on stop
            await self._store.release_leases()

    sweeper = Sweeper(store)
    sweeper.start()  # at start-up (Stores.start, a cleanup_ctx)
    await sweeper.stop()  # at shutdown

A periodic flush needs no subclass: ``Periodic("usage", 0.5, recorder.flush)`` calls the flush
every half second and once more on stop. ``job_failures`` turns jobs into the
``edge_background_job_failures`` metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from prometheus_client.core import Metric

from proxy.core.backoff import backoff_s
from proxy.telemetry import counter

log = logging.getLogger("proxy.background")

RESTART_BASE_S = 0.5
RESTART_CAP_S = 30.0


class Job:
    """The base of every background job; see the module docstring for how to use it."""

    def __init__(
        self,
        name: str,
        *,
        stop_timeout_s: float = 30.0,
        restart_base_s: float = RESTART_BASE_S,
        restart_cap_s: float = RESTART_CAP_S,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self.failures = 0  # unexpected exceptions since start, each followed by a restart
        self._streak = 0  # consecutive ones: what the backoff grows with
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stop_timeout = stop_timeout_s
        self._restart_base = restart_base_s
        self._restart_cap = restart_cap_s
        self._jitter = jitter

    # -- what a job implements --------------------------------------------------------------------

    async def run(self) -> None:
        """The job's loop. Return when ``stopping`` (or when there is nothing left to do);
        raise and the supervisor restarts it after a backoff."""
        raise NotImplementedError

    async def finish(self) -> None:
        """Called once by ``stop`` after ``run`` ended: write or hand back what the job holds."""

    def wake(self) -> None:
        """Called by ``stop`` at once: wake whatever ``run`` waits on besides ``sleep`` (an
        event of its own, a connection's loss), so that it sees ``stopping`` without delay."""

    # -- what the base gives ----------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` or until ``stop`` is called, whichever comes first; ``True`` when
        the job is stopping (its loop should end)."""
        if self._stop.is_set():
            return True
        if seconds <= 0:
            await asyncio.sleep(0)  # still yield: a loop of no-op rounds must not starve the rest
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._stop.wait()
        return self._stop.is_set()

    def succeeded(self) -> None:
        """A round went well: the next failure backs off from the shortest wait again."""
        self._streak = 0

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._task = asyncio.create_task(self._supervise(), name=f"job:{self.name}")

    async def stop(self) -> None:
        """Stop the loop between rounds, then ``finish``. Returns when both are done."""
        self._stop.set()
        self.wake()
        task, self._task = self._task, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=self._stop_timeout)
            if not done:
                log.error(
                    "background job %s did not stop within %.0fs; cancelling it",
                    self.name,
                    self._stop_timeout,
                )
                await cancel(task)
        try:
            await self.finish()
        except Exception:
            self.failures += 1
            log.exception("background job %s failed while finishing", self.name)

    async def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                await self.run()
                return
            except Exception:
                self.failures += 1
                self._streak += 1
                delay = backoff_s(
                    self._streak,
                    base_s=self._restart_base,
                    cap_s=self._restart_cap,
                    jitter=self._jitter(),
                )
                log.exception(
                    "background job %s failed (%d since start); restarting in %.1fs",
                    self.name,
                    self.failures,
                    delay,
                )
                await self.sleep(delay)


class Periodic(Job):
    """``tick`` every ``interval_s`` seconds, and once more on ``stop`` (the final flush).
    ``at_start``: also once as soon as it starts; ``on_stop=False``: no tick on ``stop`` (a
    sweep or a figure, where a final round would only delay the shutdown)."""

    def __init__(
        self,
        name: str,
        interval_s: float,
        tick: Callable[[], Awaitable[None] | None],
        *,
        at_start: bool = False,
        on_stop: bool = True,
        **job_options: Any,
    ) -> None:
        super().__init__(name, **job_options)
        self.interval_s = interval_s
        self._tick = tick
        self._at_start = at_start
        self._on_stop = on_stop

    async def _call(self) -> None:
        result = self._tick()
        if inspect.isawaitable(result):
            await result

    async def run(self) -> None:
        if self._at_start and not self.stopping:
            await self._call()
            self.succeeded()
        while not await self.sleep(self.interval_s):
            await self._call()
            self.succeeded()

    async def finish(self) -> None:
        if self._on_stop:
            await self._call()


class RecoveryProbe(Job):
    """A circuit breaker's probe: ``check`` every ``interval_s`` seconds until it passes, then
    ``recovered`` once, and the job ends. A failed check is expected (the dependency is down),
    not a bug: ``failed`` is called and the probe goes on. ``start`` again at the next trip."""

    def __init__(
        self,
        name: str,
        interval_s: float,
        check: Callable[[], Awaitable[None]],
        recovered: Callable[[], None],
        failed: Callable[[], None] = lambda: None,
        **job_options: Any,
    ) -> None:
        super().__init__(name, **job_options)
        self.interval_s = interval_s
        self._check = check
        self._recovered = recovered
        self._failed = failed

    async def run(self) -> None:
        while not await self.sleep(self.interval_s):
            try:
                await self._check()
            except Exception:
                self._failed()
                continue
            self._recovered()
            return


class Once(Job):
    """``action`` once, to its end; after an unexpected exception it is restarted with backoff
    until it completes. ``restart`` abandons the one under way and begins again at once (its
    result would be stale: a preload after the LISTEN link reconnected, say); ``stop`` abandons
    it too, since a half-done action holds nothing to hand back."""

    def __init__(
        self, name: str, action: Callable[[], Awaitable[None]], **job_options: Any
    ) -> None:
        super().__init__(name, **job_options)
        self._action = action

    async def run(self) -> None:
        await self._action()

    def restart(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        self.start()

    def wake(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has finished."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def job_failures(jobs: Iterable[Job]) -> Metric:
    return counter(
        "edge_background_job_failures",
        "Unexpected exceptions in background jobs (each followed by a restart with backoff)",
        # Not "job": Prometheus's own target label, which would rename this one exported_job.
        ["background_job"],
        [([job.name], job.failures) for job in jobs],
    )
