"""Background tasks of the stores: one way to run a periodic flush and to stop a task."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable
from typing import Any


def every(interval_s: float, tick: Callable[[], Awaitable[None] | None]) -> asyncio.Task[None]:
    """Call ``tick`` every ``interval_s`` seconds until the task is cancelled."""

    async def run() -> None:
        while True:
            await asyncio.sleep(interval_s)
            result = tick()
            if inspect.isawaitable(result):
                await result

    return asyncio.ensure_future(run())


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has finished."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
