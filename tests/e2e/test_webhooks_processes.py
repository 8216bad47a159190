"""Dispatcher processes (CONTRACT §11 guarantees): a SIGKILLed `webhooks run` loses nothing,
two dispatchers make every attempt once, SIGTERM finishes what is in flight, and `serve` in
database mode runs a dispatcher and shows its figures on /metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from tests.e2e.support import within
from tests.e2e.test_cli import assert_one_line_error, run
from tests.e2e.webhooks import add_webhook, holds, new_tenant, publish, receiving
from tests.procs import ROOT, free_port, start_proxy, stop, write_config


@pytest.fixture
def dsn(migrated_dsn: str) -> str:
    """A fresh database per test (the e2e ``db`` fixture connects to it): no test sees
    another's due attempts."""
    return migrated_dsn


def config(tmp: Path, **webhooks: Any) -> Path:
    table = {"allow_http": True, "allow_networks": ["127.0.0.0/8"], **webhooks}
    return write_config(
        tmp / f"edge-{os.urandom(4).hex()}.toml",
        upstreams={"render-api": {"urls": ["http://127.0.0.1:9"]}},
        routes=[],
        sections={"webhooks": table},
    )


@contextmanager
def dispatcher(path: Path, dsn: str, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`python -m proxy webhooks run`; its output (log and attempt lines) goes to a file."""
    log = Path(tempfile.mkstemp(prefix="edge-webhooks-", suffix=".log")[1])
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "webhooks", "run", "--config", str(path), *args],
        cwd=ROOT,
        env={**env, "DATABASE_URL": dsn},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc, log
    finally:
        stop(proc)
        log.unlink(missing_ok=True)


def attempt_lines(log: Path) -> list[dict[str, Any]]:
    lines = []
    for line in log.read_bytes().splitlines():
        if line.startswith(b"{"):
            entry = orjson.loads(line)
            if entry.get("kind") == "webhook_attempt":
                lines.append(entry)
    return lines


async def successes(db: asyncpg.Connection) -> int:
    n = await db.fetchval("SELECT count(*) FROM identity.tenant_webhook_deliveries WHERE succeeded")
    return int(n)


async def test_sigkill_mid_flight_loses_nothing(
    db: asyncpg.Connection, migrated_dsn: str, tmp_path: Path
) -> None:
    tenant = await new_tenant(db)
    async with receiving(delay_s=0.5) as r:
        await add_webhook(db, tenant, r.url())
        events = {await publish(db, tenant) for _ in range(20)}
        path = config(tmp_path, timeout_s=2, lease_s=7)
        with dispatcher(path, migrated_dsn) as (first, _log):
            # Requests are in flight (the receiver answers after 0.5 s): kill now.
            await within(10, holds(lambda: len(r.received) >= 3))
            first.send_signal(signal.SIGKILL)
            first.wait(5)
        # Sent by the first and not recorded by it: cut mid-flight.
        recorded = {
            str(row["event_id"])
            for row in await db.fetch(
                "SELECT event_id FROM identity.tenant_webhook_deliveries WHERE succeeded"
            )
        }
        in_flight_at_kill = set(r.ids()) - recorded
        with dispatcher(path, migrated_dsn):
            await within(20, lambda: _equals(successes(db), 20))
    seen = Counter(r.ids())
    assert set(seen) == events  # every event delivered at least once...
    rows = await db.fetch(
        "SELECT event_id::text, count(*) FILTER (WHERE succeeded) AS ok"
        " FROM identity.tenant_webhook_deliveries GROUP BY event_id"
    )
    assert {r["event_id"]: r["ok"] for r in rows} == dict.fromkeys(events, 1)
    # ...and what was in flight when the first one died was sent again under the same
    # webhook-id, after the lease, by the second.
    assert in_flight_at_kill
    assert all(seen[event_id] == 2 for event_id in in_flight_at_kill)
    assert all(seen[event_id] == 1 for event_id in recorded)  # what was recorded stays done


async def _equals(value: Any, expected: int) -> bool:
    return bool(await value == expected)


async def test_two_dispatchers_make_each_attempt_once(
    db: asyncpg.Connection, migrated_dsn: str, tmp_path: Path
) -> None:
    tenant = await new_tenant(db)
    async with receiving() as r:
        hooks = [await add_webhook(db, tenant, r.url(f"/{i}")) for i in range(2)]
        path = config(tmp_path, max_in_flight_per_webhook=8)
        with (
            dispatcher(path, migrated_dsn) as (a, log_a),
            dispatcher(path, migrated_dsn) as (b, log_b),
        ):
            await within(10, holds(lambda: b"dispatcher running" in log_a.read_bytes()))
            await within(10, holds(lambda: b"dispatcher running" in log_b.read_bytes()))
            async with db.transaction():
                events = {await publish(db, tenant) for _ in range(200)}
            await within(60, lambda: _equals(successes(db), 400))
            await asyncio.sleep(0.3)  # anything made twice would have arrived by now
            # Stopped (SIGTERM flushes their attempt lines), then counted.
            await asyncio.gather(asyncio.to_thread(stop, a), asyncio.to_thread(stop, b))
            made_a, made_b = len(attempt_lines(log_a)), len(attempt_lines(log_b))
    received = Counter((got.path, got.event_id) for got in r.received)
    assert set(received) == {(f"/{i}", e) for i in range(2) for e in events}
    assert set(received.values()) == {1}  # no attempt made twice
    rows = await db.fetch(
        "SELECT webhook_id::text, event_id::text, count(*) AS n"
        " FROM identity.tenant_webhook_deliveries WHERE succeeded GROUP BY 1, 2"
    )
    assert len(rows) == 400 and {r["n"] for r in rows} == {1}
    assert {r["webhook_id"] for r in rows} == set(hooks)
    assert made_a + made_b == 400
    assert made_a > 0 and made_b > 0, (made_a, made_b)  # both took part


async def test_sigterm_finishes_the_attempts_in_flight(
    db: asyncpg.Connection, migrated_dsn: str, tmp_path: Path
) -> None:
    tenant = await new_tenant(db)
    async with receiving(delay_s=0.5) as r:
        await add_webhook(db, tenant, r.url())
        path = config(tmp_path, timeout_s=5)
        with dispatcher(path, migrated_dsn) as (proc, log):
            event_id = await publish(db, tenant)
            await within(10, holds(lambda: bool(r.received)))
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 10) == 0
            output = log.read_text()
    assert "Traceback" not in output
    assert r.ids() == [event_id]
    assert await successes(db) == 1  # answered after the SIGTERM, and recorded


async def test_serve_runs_a_dispatcher_and_shows_its_figures(
    db: asyncpg.Connection, migrated_dsn: str, tmp_path: Path
) -> None:
    tenant = await new_tenant(db)
    async with receiving() as r:
        await add_webhook(db, tenant, r.url())
        off = start_proxy(config(tmp_path, enabled=False), env={"DATABASE_URL": migrated_dsn})
        try:
            event_id = await publish(db, tenant)
            await asyncio.sleep(1.5)  # a dispatcher would have delivered it by now
            assert r.received == []
        finally:
            stop(off.proc)
        proxy = start_proxy(config(tmp_path), env={"DATABASE_URL": migrated_dsn})
        try:
            await within(5, holds(lambda: r.ids() == [event_id]))

            def metrics() -> str:
                url = f"http://127.0.0.1:{proxy.admin_port}/metrics"
                with urllib.request.urlopen(url, timeout=5) as answer:
                    text: str = answer.read().decode()
                    return text

            await within(5, holds(lambda: 'outcome="success"} 1.0' in metrics()))
            text = await asyncio.to_thread(metrics)
        finally:
            stop(proxy.proc)
    assert "edge_webhook_attempt_duration_seconds_count 1.0" in text
    assert "edge_webhooks_disabled 0.0" in text
    # Its jobs are in the server's one failures family (a second family would be invalid).
    assert 'edge_background_job_failures_total{background_job="webhook-dispatcher"} 0.0' in text
    assert text.count("# TYPE edge_background_job_failures_total counter") == 1


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.status, answer.read().decode()


async def test_webhooks_run_serves_metrics_and_healthz_on_its_admin_listener(
    db: asyncpg.Connection, migrated_dsn: str, tmp_path: Path
) -> None:
    tenant = await new_tenant(db)
    port = free_port()
    async with receiving() as r:
        await add_webhook(db, tenant, r.url())
        path = config(tmp_path)
        with dispatcher(path, migrated_dsn, "--admin-listen", f"127.0.0.1:{port}"):
            event_id = await publish(db, tenant)
            await within(10, holds(lambda: r.ids() == [event_id]))

            def metrics() -> str:
                return get(f"http://127.0.0.1:{port}/metrics")[1]

            await within(5, holds(lambda: 'outcome="success"} 1.0' in metrics()))
            text = await asyncio.to_thread(metrics)
            health = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/healthz")
    assert health == (200, '{"status": "ok"}')
    assert "edge_webhook_attempt_duration_seconds_count 1.0" in text
    assert "edge_webhook_attempts_due" in text
    # Every job of the dispatcher, its LISTEN connection included, in the failures family.
    for job in ("webhook-dispatcher", "flatrender-edge-webhooks", "webhook-retention"):
        assert f'edge_background_job_failures_total{{background_job="{job}"}} 0.0' in text


def test_webhooks_run_refuses_a_bad_admin_listen() -> None:
    result = run("webhooks", "run", "--admin-listen", "nowhere", env={"DATABASE_URL": "x"})
    assert result.returncode == 2
    assert_one_line_error(result, "--admin-listen")


async def test_serve_drains_its_connections_while_webhook_attempts_finish(
    db: asyncpg.Connection, migrated_dsn: str, tmp_path: Path
) -> None:
    tenant = await new_tenant(db)
    async with receiving(hang=True) as hole:
        await add_webhook(db, tenant, hole.url())
        path = config(tmp_path, timeout_s=6)
        proxy = start_proxy(path, env={"DATABASE_URL": migrated_dsn})
        try:
            await publish(db, tenant)
            await within(10, holds(lambda: bool(hole.received)))  # an attempt of up to 6 s
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"GET /anything HTTP/1.1\r\nHost: edge.test\r\n\r\n")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"connection: close" not in head.lower()  # kept alive, now idle
            proxy.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.wait_for(reader.read(), 10)  # the rest of the answer, then the close
            closed_after = time.monotonic() - signalled
            writer.close()
            assert await asyncio.to_thread(proxy.proc.wait, 15) == 0
        finally:
            stop(proxy.proc)
    # The drain closed the idle connection at once, not after the webhook attempt ended.
    assert closed_after < 3, closed_after
