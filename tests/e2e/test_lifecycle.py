"""Process lifecycle (CONTRACT §1 serve, issue 7): workers, SIGTERM drain, SIGHUP reload."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import PIPELINE, ROUTING, build_app, build_stores
from proxy.settings import load_settings
from tests.procs import Echo, Proxy, start_proxy, stop, write_config

HOST = "flatrender.test"


def _config(
    tmp: Path,
    echo: Echo,
    *extra_routes: dict[str, object],
    audit: Path | None = None,
    shutdown_s: float = 30,
) -> Path:
    path = write_config(
        tmp / "edge.toml",
        server={"shutdown_timeout_s": shutdown_s},
        upstreams={"render-api": {"urls": [echo.url]}},
        routes=[
            {"prefix": "/public", "upstream": "render-api", "auth": "none", "audit": True},
            *extra_routes,
        ],
    )
    if audit is not None:
        path.write_text(
            path.read_text() + f'\n[audit]\njsonl_path = "{audit}"\nflush_interval_ms = 3600000\n'
        )
    return path


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


async def status(http: aiohttp.ClientSession, proxy: Proxy, path: str) -> int:
    async with http.get(f"{proxy.url}{path}", headers={"Host": HOST}) as r:
        await r.read()
        return r.status


async def eventually(seconds: float, probe) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + seconds
    while not await probe():
        assert time.monotonic() < end, f"not within {seconds}s"
        await asyncio.sleep(0.05)


async def test_two_workers_survive_one_being_killed(
    echo: Echo, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    proxy = start_proxy(_config(tmp_path, echo), args=("--workers", "2"))
    try:
        parent = psutil.Process(proxy.proc.pid)
        await eventually(5, lambda: _workers(parent, 2))
        victim = parent.children()[0]
        victim.kill()
        await eventually(5, lambda: _replaced(parent, victim.pid))
        statuses = [await status(http, proxy, f"/public/{i}") for i in range(100)]
        assert statuses == [200] * 100
        workers = parent.children()
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(20) == 0
        _gone, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive  # the parent exits only after every worker has
    finally:
        output = proxy.output()
    assert "Traceback" not in output


async def test_metrics_with_two_workers_show_both_whichever_answers(
    echo: Echo, tmp_path: Path
) -> None:
    """The workers share the admin port, so a scrape reaches one of them; it must still count
    every request, each worker's series labelled by worker."""
    from prometheus_client.parser import text_string_to_metric_families

    proxy = start_proxy(_config(tmp_path, echo), args=("--workers", "2"))
    try:
        parent = psutil.Process(proxy.proc.pid)
        await eventually(5, lambda: _workers(parent, 2))
        # A new connection per request, so the kernel spreads them over both workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            for i in range(40):
                assert await status(s, proxy, f"/public/{i}") == 200
            url = f"http://127.0.0.1:{proxy.admin_port}/metrics"
            for _ in range(6):  # several scrapes: both workers answer some of them
                async with s.get(url) as r:
                    text = await r.text()
                served = {
                    sample.labels["worker"]: sample.value
                    for family in text_string_to_metric_families(text)
                    for sample in family.samples
                    if sample.name == "edge_requests_total" and sample.labels["route"] == "/public"
                }
                assert sum(served.values()) == 40, served
                assert set(served) <= {"0", "1"}
                assert "\nedge_metrics_workers_answered 2.0\n" in text
    finally:
        stop(proxy.proc)


async def _workers(parent: psutil.Process, n: int) -> bool:
    return len(parent.children()) == n


async def _replaced(parent: psutil.Process, dead: int) -> bool:
    pids = [p.pid for p in parent.children()]
    return len(pids) == 2 and dead not in pids


async def test_sigterm_under_load_finishes_in_flight_requests_and_audits_them(
    echo: Echo, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    audit = tmp_path / "audit.jsonl"
    proxy = start_proxy(_config(tmp_path, echo, audit=audit))
    ids = [str(uuid.uuid4()) for _ in range(30)]

    async def slow(rid: str) -> int:
        async with http.get(
            f"{proxy.url}/public/slow?seconds=1", headers={"Host": HOST, "X-Request-Id": rid}
        ) as r:
            await r.read()
            return r.status

    try:
        in_flight = [asyncio.ensure_future(slow(rid)) for rid in ids]
        await asyncio.sleep(0.3)  # let them all reach the upstream (they take 1 s there)
        proxy.proc.send_signal(signal.SIGTERM)
        assert await asyncio.gather(*in_flight) == [200] * 30
        assert await asyncio.to_thread(proxy.proc.wait, 20) == 0
    finally:
        output = proxy.output()
    written = [json.loads(line)["request_id"] for line in audit.read_text().splitlines()]
    assert sorted(written) == sorted(ids)
    assert "Traceback" not in output


async def test_sighup_picks_up_a_new_route_without_dropping_requests(
    echo: Echo, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = _config(tmp_path, echo)
    proxy = start_proxy(config)
    try:
        assert await status(http, proxy, "/fresh/x") == 404
        long_request = asyncio.ensure_future(status(http, proxy, "/public/slow?seconds=1"))
        await asyncio.sleep(0.2)
        fresh = {"prefix": "/fresh", "upstream": "render-api", "auth": "none"}
        _config(tmp_path, echo, fresh)
        proxy.proc.send_signal(signal.SIGHUP)
        await eventually(5, lambda: _is(http, proxy, "/fresh/x", 200))
        assert await long_request == 200  # in flight across the reload
        # A broken file is refused and the running configuration stays.
        config.write_text(
            config.read_text().replace('upstream = "render-api"', 'upstream = "nowhere"')
        )
        proxy.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)  # give the (refused) reload its chance to do harm
        assert await status(http, proxy, "/fresh/x") == 200
        assert proxy.proc.poll() is None
    finally:
        output = proxy.output()
    assert "reload refused" in output and "unknown upstream" in output
    assert "Traceback" not in output


async def test_a_reload_adding_a_metered_route_to_workers_without_redis_is_refused(
    echo: Echo, tmp_path: Path
) -> None:
    """Without Redis each worker counts the quota alone: a metered route under --workers 2
    would admit a tenant's quota twice, so a reload bringing one is refused as a start-up is."""
    proxy = start_proxy(_config(tmp_path, echo), args=("--workers", "2"))
    assert proxy.log is not None
    log = proxy.log

    async def logged(text: str, n: int) -> bool:
        return log.read_text(errors="replace").count(text) >= n

    try:
        await eventually(10, lambda: logged("listening on", 2))  # both handle SIGHUP now
        metered = {"prefix": "/metered", "upstream": "render-api", "auth": "none"}
        _config(tmp_path, echo, {**metered, "audit": True, "meter": "renders"})
        proxy.proc.send_signal(signal.SIGHUP)
        await eventually(10, lambda: logged("reload refused", 2))  # by each worker
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            statuses = {await status(s, proxy, f"/metered/{i}") for i in range(10)}
        assert statuses == {404}  # the running configuration stays, in both workers
    finally:
        output = proxy.output()
    assert 'a metered route (meter = "renders") needs REDIS_URL' in output
    assert "reloaded" not in output and "Traceback" not in output


async def _is(http: aiohttp.ClientSession, proxy: Proxy, path: str, want: int) -> bool:
    return await status(http, proxy, path) == want


async def test_readyz_turns_503_while_draining(
    echo: Echo, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    proxy = start_proxy(_config(tmp_path, echo))
    admin = f"http://127.0.0.1:{proxy.admin_port}/readyz"
    try:
        slow = asyncio.ensure_future(status(http, proxy, "/public/slow?seconds=1.5"))
        await asyncio.sleep(0.2)
        proxy.proc.send_signal(signal.SIGTERM)

        async def not_ready() -> bool:
            async with http.get(admin) as r:
                return r.status == 503

        await eventually(1, not_ready)
        assert await slow == 200
    finally:
        stop(proxy.proc)


async def test_a_reload_renaming_the_upstream_mid_request_does_not_fail_the_request(
    echo: Echo, tmp_path: Path
) -> None:
    """CONTRACT §7 / issue 13: a SIGHUP that lands after a request was routed and before it is
    forwarded renames its upstream. The route and its pool come from one snapshot, so the
    request is forwarded on the configuration it was routed with (before: a 500), and the next
    one on the new configuration. The reload is made to land exactly there by a wrapper around
    the forwarder, the stage after routing."""
    settings = load_settings({}, str(_config(tmp_path, echo)))
    renamed = load_settings(
        {},
        str(
            write_config(
                tmp_path / "renamed.toml",
                upstreams={"render-v2": {"urls": [echo.url]}},
                routes=[{"prefix": "/public", "upstream": "render-v2", "auth": "none"}],
            )
        ),
    )
    app = build_app(settings, build_stores(settings))
    pipeline, routing = app[PIPELINE], app[ROUTING]
    forward = pipeline.forward
    reloads = 0

    async def sighup_now(request: web.Request) -> web.StreamResponse:
        nonlocal reloads
        if reloads == 0:  # what the SIGHUP handler does (app._reloader)
            routing.reload(renamed, grace_s=60)
            pipeline.replan()
        reloads += 1
        return await forward(request)

    pipeline.forward = sighup_now
    try:
        async with TestClient(TestServer(app)) as client:
            for _ in range(2):  # routed before the reload, then after it
                r = await client.get("/public/x", headers={"Host": HOST})
                assert r.status == 200, await r.text()
        assert reloads == 2 and list(routing.pools) == ["render-v2"]
    finally:
        await routing.close()


async def test_a_stop_while_a_replacement_worker_starts_still_exits_cleanly(
    echo: Echo, tmp_path: Path
) -> None:
    """SIGTERM reaching a worker that is still starting (here: just forked to replace a killed
    one) is a stop like any other, not a death by the signal's default action: exit 0."""
    proxy = start_proxy(_config(tmp_path, echo), args=("--workers", "2"))
    try:
        parent = psutil.Process(proxy.proc.pid)
        await eventually(5, lambda: _workers(parent, 2))
        victim = parent.children()[0]
        victim.kill()
        await eventually(5, lambda: _replaced(parent, victim.pid))
        proxy.proc.send_signal(signal.SIGTERM)  # at once: the replacement is still starting
        assert proxy.proc.wait(20) == 0
    finally:
        output = proxy.output()
    assert "Traceback" not in output
