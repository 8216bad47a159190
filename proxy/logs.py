"""Logging that can never stall the event loop.

A ``logging.StreamHandler`` writes synchronously: when stderr is a pipe nobody drains (a
supervisor, a container runtime under pressure), a burst of log lines fills it and the next
write blocks the whole event loop, every request with it. Records therefore go through a
``QueueHandler`` to a ``QueueListener`` thread that does the writing; the queue is bounded and
a record that does not fit is dropped and counted rather than waited for.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    def __init__(self, q: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(q)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


def start_logging(
    level: int = logging.WARNING, capacity: int = 10_000
) -> logging.handlers.QueueListener:
    """Route every logger through a background writer; call ``stop()`` on exit to flush."""
    q: queue.Queue[logging.LogRecord] = queue.Queue(capacity)
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(logging.Formatter(FORMAT))
    listener = logging.handlers.QueueListener(q, writer, respect_handler_level=False)
    root = logging.getLogger()
    root.handlers[:] = [_DroppingQueueHandler(q)]
    root.setLevel(level)
    listener.start()
    return listener
