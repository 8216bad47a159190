"""An open-loop HTTP/1.1 load generator: requests at a fixed rate, latency from the scheduled
send time (no coordinated omission), for the benchmark's latency-under-load figures.

wrk is closed-loop (a slow answer delays the next request, hiding the queueing it caused) and
wrk2 is not packaged by Debian; this is the small part of wrk2 the benchmark needs. Request
``i`` is due at ``t0 + i / rate``; when it is due it goes out on an idle keep-alive connection,
or waits in a backlog until one is free, and its latency runs from when it was due to when its
answer was complete. So a stall of the server shows up in the latency of every request that was
due during the stall, as a user would see it. ``late`` is how long after its due time each
request actually went out (the generator's own lag plus the backlog): it is part of the
latency, and reported so the generator's share can be told apart.

One process, one event loop (uvloop), one request in flight per connection, no pipelining.
Answers are parsed just enough (status line, Content-Length or chunked). Prints one JSON object.

    python loadtests/openloop.py --url http://127.0.0.1:8080/plain/x --rate 2500 --seconds 5 \\
        [--connections 64] [--header 'Host: videos.acme.test'] [--warmup 1] [--dump FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (``q`` in 0..100); 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def response_end(buf: bytes | bytearray) -> tuple[int, int] | None:
    """(status, length of the first complete response in ``buf``) or None if incomplete."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = bytes(buf[:head_end]).lower()
    status = int(head[9:12])
    body_start = head_end + 4
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : line_end if line_end >= 0 else None])
        return (status, body_start + length) if len(buf) >= body_start + length else None
    if b"\r\ntransfer-encoding: chunked" in head:
        pos = body_start
        while True:
            size_end = buf.find(b"\r\n", pos)
            if size_end < 0:
                return None
            size = int(bytes(buf[pos:size_end]).split(b";")[0], 16)
            pos = size_end + 2 + size + 2
            if len(buf) < pos:
                return None
            if size == 0:
                return status, pos
    if status in (204, 304) or 100 <= status < 200:
        return status, body_start
    return None  # close-delimited bodies are not supported (the proxy always frames them)


@dataclass
class Recorder:
    latencies: list[float] = field(default_factory=list)  # seconds, from due time
    late: list[float] = field(default_factory=list)  # seconds, due time to actual send
    errors: int = 0  # non-2xx answers and lost connections
    recording: bool = True


class Connection(asyncio.Protocol):
    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.buf = bytearray()
        self.due = 0.0
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, due: float) -> None:
        assert self.transport is not None
        self.due, self.busy = due, True
        sent = time.perf_counter()
        self.transport.write(self.gen.request)
        if self.gen.rec.recording:
            self.gen.rec.late.append(sent - due)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = response_end(self.buf)
        if end is None:
            return
        status, length = end
        done = time.perf_counter()
        del self.buf[:length]
        rec = self.gen.rec
        if rec.recording:
            rec.latencies.append(done - self.due)
            if not 200 <= status < 300:
                rec.errors += 1
        self.busy = False
        self.gen.answered()
        self.gen.idle_again(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy:
            self.gen.rec.errors += 1
            self.gen.answered()
        self.gen.lost(self)


class Generator:
    def __init__(self, host: str, port: int, request: bytes, connections: int) -> None:
        self.host, self.port, self.request = host, port, request
        self.connections = connections
        self.idle: deque[Connection] = deque()
        self.backlog: deque[float] = deque()
        self.rec = Recorder()
        self.completed = 0
        self.backlog_max = 0
        self.t0, self.rate, self.total, self.next_i = 0.0, 1.0, 0, 0
        self.target = 0  # ``completed`` at which the current run is over
        self.all_done = asyncio.Event()

    def answered(self) -> None:
        self.completed += 1
        if self.completed >= self.target:
            self.all_done.set()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.connections):
            _, proto = await loop.create_connection(lambda: Connection(self), self.host, self.port)
            self.idle.append(proto)

    def idle_again(self, conn: Connection) -> None:
        self.dispatch()
        if self.backlog:
            conn.send(self.backlog.popleft())
        else:
            self.idle.append(conn)

    def lost(self, conn: Connection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def dispatch(self) -> None:
        """Send every request that is due by now (to an idle connection, else the backlog)."""
        now, i = time.perf_counter(), self.next_i
        while i < self.total and self.t0 + i / self.rate <= now:
            due = self.t0 + i / self.rate
            if self.idle:
                self.idle.popleft().send(due)
            else:
                self.backlog.append(due)
            i += 1
        self.next_i = i
        self.backlog_max = max(self.backlog_max, len(self.backlog))

    async def run(self, rate: float, seconds: float, grace_s: float = 5.0) -> int:
        """Issue ``rate x seconds`` requests on schedule; return how many got no answer.

        The event loop's timers have millisecond granularity (and a shorter delay makes the
        loop spin, stealing the core the generator shares with the upstream, Redis and
        Postgres), so a pacing thread sleeps until each due time (``clock_nanosleep``: tens of
        microseconds late) and wakes the loop, which sends what is due. Answers also trigger a
        check for due requests."""
        loop = asyncio.get_running_loop()
        self.rate, self.total, self.next_i = rate, int(rate * seconds), 0
        start_completed = self.completed
        finished = loop.create_future()
        self.t0 = time.perf_counter() + 0.01

        def last() -> None:
            self.dispatch()
            if not finished.done():
                finished.set_result(None)

        def pace() -> None:
            i = 0
            while i < self.total:
                delay = self.t0 + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                loop.call_soon_threadsafe(self.dispatch)
                i = max(i + 1, int((time.perf_counter() - self.t0) * rate) + 1)
            loop.call_soon_threadsafe(last)

        pacer = threading.Thread(target=pace, name="openloop-pacer", daemon=True)
        pacer.start()
        await finished
        self.target = start_completed + self.total
        if self.completed < self.target:
            self.all_done.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self.all_done.wait()
        pacer.join(1.0)
        return self.total - (self.completed - start_completed)


async def measure(
    url: str, headers: list[str], rate: float, seconds: float, connections: int, warmup: float
) -> tuple[dict[str, float], list[float]]:
    """The summary of one run, and every latency (seconds, ascending)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    names = {h.split(":", 1)[0].strip().lower() for h in headers}
    lines = [f"GET {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: {parts.netloc}")
    request = ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode("latin-1")
    gen = Generator(host, port, request, connections)
    await gen.connect()
    if warmup > 0:
        gen.rec.recording = False
        await gen.run(rate, warmup)
        gen.rec = Recorder()
    started = time.perf_counter()
    unanswered = await gen.run(rate, seconds)
    elapsed = time.perf_counter() - started
    lat = sorted(gen.rec.latencies)
    late = sorted(gen.rec.late)
    ms = 1000.0
    summary = {
        "rate": rate,
        "seconds": seconds,
        "requests": len(lat),
        "achieved_rps": len(lat) / elapsed if elapsed else 0.0,
        "errors": gen.rec.errors + unanswered,
        "p50_ms": percentile(lat, 50) * ms,
        "p90_ms": percentile(lat, 90) * ms,
        "p99_ms": percentile(lat, 99) * ms,
        "p999_ms": percentile(lat, 99.9) * ms,
        "max_ms": (lat[-1] if lat else 0.0) * ms,
        "late_p50_ms": percentile(late, 50) * ms,
        "late_p99_ms": percentile(late, 99) * ms,
        "backlog_max": gen.backlog_max,
    }
    return summary, lat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds at the rate, unrecorded")
    parser.add_argument("--dump", type=Path, help="write every latency (seconds, float64) here")
    args = parser.parse_args()
    if not (0 < args.rate <= 1_000_000 and 0 < args.seconds <= 600 and args.connections > 0):
        parser.error("rate, seconds and connections must be positive (seconds <= 600)")
    import uvloop

    result, latencies = uvloop.run(
        measure(args.url, args.header, args.rate, args.seconds, args.connections, args.warmup)
    )
    if args.dump:
        with args.dump.open("wb") as f:
            array("d", latencies).tofile(f)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
