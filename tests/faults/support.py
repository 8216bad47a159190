"""Helpers of the fault tests: a proxy with a JSON-lines audit file, and counts of what a
process holds (its TCP connections by port, its file descriptors), read with psutil."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.procs import ROOT, Echo, Proxy, free_port, start_proxy, wait_port, write_config


def start_quiet_echo(log: Path) -> Echo:
    """The echo upstream with its output in a file. ``tests.procs.start_echo`` gives it a pipe
    nobody reads: aiohttp logs a traceback for every connection reset mid-answer, and after a
    few dozen of those the full pipe blocks the echo (and every test behind it) for good."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "loadtests" / "echo_upstream.py"), "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_port(port, proc)
    return Echo(port, proc)


def start_audited_proxy(
    tmp: Path,
    upstreams: Mapping[str, Mapping[str, Any]],
    routes: list[Mapping[str, Any]],
    **server: Any,
) -> tuple[Proxy, Path]:
    """A proxy whose audit rows go to ``tmp/audit.jsonl`` (flushed every 100 ms)."""
    audit = tmp / "audit.jsonl"
    config = write_config(
        tmp / "edge.toml",
        server={"trusted_proxies": ["127.0.0.1/32"], **server},
        upstreams=upstreams,
        routes=routes,
    )
    with config.open("a") as f:
        f.write(f'[audit]\njsonl_path = "{audit}"\nflush_interval_ms = 100\n')
    return start_proxy(config), audit


def audit_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Holdings:
    """What a process holds: client connections on its listening port (any state but LISTEN:
    a CLOSE_WAIT left behind is a leak too), connections to an upstream port, and fds."""

    clients: int
    upstream: int
    fds: int


def holdings(pid: int, listen_port: int, upstream_port: int) -> Holdings:
    process = psutil.Process(pid)
    conns = process.net_connections(kind="tcp")
    clients = sum(
        1 for c in conns if c.laddr and c.laddr.port == listen_port and c.status != "LISTEN"
    )
    upstream = sum(1 for c in conns if c.raddr and c.raddr.port == upstream_port)
    return Holdings(clients, upstream, process.num_fds())


def settle(
    read: Callable[[], Holdings], ok: Callable[[Holdings], bool], deadline_s: float = 10.0
) -> Holdings:
    """Poll ``read`` until ``ok`` holds (returns that reading) or the deadline passes (returns
    the last reading, for the caller's assertion to show)."""
    end = time.monotonic() + deadline_s
    while True:
        now = read()
        if ok(now) or time.monotonic() > end:
            return now
        time.sleep(0.05)


def wait_for(predicate: Callable[[], bool], deadline_s: float = 10.0) -> bool:
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def metric(admin_port: int, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` (with these label values) on the admin's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )
