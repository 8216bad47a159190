"""``serve --workers N``: N forked worker processes sharing the listening ports (SO_REUSEPORT,
the kernel spreads connections), under a parent that only supervises.

The parent forwards SIGTERM/SIGINT (drain and exit) and SIGHUP (reload routes) to every
worker, restarts a worker that dies unexpectedly, and exits once all workers have exited after
a stop. Each worker builds its own event loop, caches, LISTEN connection, Redis client and
audit flusher after the fork: nothing with a socket or a thread crosses a fork.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("proxy.supervisor")

# A worker that keeps dying (bad config only it sees, a crash loop) is restarted at most
# this often, so the parent never spins.
RESTART_BACKOFF_S = 1.0


def run_workers(count: int, worker: Callable[[int], int]) -> int:
    """Fork ``count`` workers running ``worker(index)``; supervise until stopped (a restarted
    worker keeps its index). Returns the exit status of the whole server."""
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False
    last_start: dict[int, float] = {}

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = worker(index)
            finally:
                os._exit(code)
        children[pid] = index
        last_start[index] = time.monotonic()

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for index in range(count):
        spawn(index)
    log.warning("supervising %d workers: %s", count, sorted(children))
    failed = False
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        index = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            # Killed by the SIGTERM forwarded to it: it was still starting (the worker's own
            # handler, which drains, is installed before it listens), so nothing was lost.
            failed |= code not in (0, -signal.SIGTERM)
            continue
        log.error("worker %d (pid %d) exited with %d; restarting it", index, pid, code)
        wait = RESTART_BACKOFF_S - (time.monotonic() - last_start.get(index, 0.0))
        if wait > 0:
            time.sleep(wait)
        if not stopping:
            spawn(index)
    return 1 if failed else 0
