"""The proxy run with the lean upstream transport experiment (loadtests/lean_transport.py)
against the echo upstream: a plain GET goes through the lean path with the same target and
forwarded headers as the product's path, and the answer comes back with the proxy's stamps; a
POST still goes through the product's ClientSession path."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.procs import ROOT, Echo, free_port, stop, wait_port, wait_ready, write_config

LEAN = str(ROOT / "loadtests" / "lean_transport.py")
HOST = "videos.acme.test"  # a tenant of config/tenants.toml


@pytest.fixture(scope="module")
def lean_proxy(echo: Echo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    config = write_config(
        tmp_path_factory.mktemp("lean") / "edge.toml",
        upstreams={"render-api": {"urls": [echo.url]}},
        routes=[{"prefix": "/public", "upstream": "render-api", "auth": "none"}],
    )
    port, admin = free_port(), free_port()
    log = Path(tempfile.mkstemp(prefix="edge-lean-", suffix=".log")[1])
    cmd = [sys.executable, LEAN, "serve", "--config", str(config)]
    cmd += ["--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc)
        wait_ready(admin)
        yield port
    finally:
        stop(proc)


async def test_lean_path_forwards_a_get(lean_proxy: int) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(2):  # the second one on a kept-alive upstream connection
            async with s.get(
                f"http://127.0.0.1:{lean_proxy}/public/x?a=1",
                headers={"Host": HOST, "X-Probe": "yes"},
            ) as r:
                assert r.status == 200
                request_id = r.headers["X-Request-Id"]  # stamped by the proxy
                seen = await r.json()
            assert (seen["method"], seen["path"], seen["query"]) == ("GET", "/public/x", "a=1")
            headers = CIMultiDict(seen["headers"])
            assert headers["X-Probe"] == "yes"
            assert headers["X-Request-Id"] == request_id
            assert headers["X-Forwarded-For"] == "127.0.0.1"
            assert headers["X-Forwarded-Host"] == HOST
            assert headers["X-FlatRender-Tenant-Slug"] == "acme"


async def test_a_post_still_takes_the_session_path(lean_proxy: int) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://127.0.0.1:{lean_proxy}/public/y", data=b"z" * 1000, headers={"Host": HOST}
        ) as r,
    ):
        assert r.status == 200
        seen = await r.json()
    assert (seen["method"], seen["body_bytes"]) == ("POST", 1000)


async def test_the_lean_path_answers_whole(lean_proxy: int) -> None:
    """A chunked upstream answer comes back with its length: the lean path reads it whole
    (the product's path streams it, chunked), which shows the GET took the lean path."""
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"http://127.0.0.1:{lean_proxy}/public/stream?bytes=200000", headers={"Host": HOST}
        ) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Length"] == "200000"
        assert "Transfer-Encoding" not in r.headers
        assert len(await r.read()) == 200000
