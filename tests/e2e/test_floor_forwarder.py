"""The benchmark's reference, loadtests/floor_forwarder.py: it forwards (method, path and query,
body, headers both ways) and refuses to run on aiohttp's pure-Python parser, as ``serve`` does,
so that the floor it measures is the C one the proxy runs on."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import aiohttp
import pytest

from tests.procs import ROOT, Echo, free_port, stop, wait_port

FLOOR = str(ROOT / "loadtests" / "floor_forwarder.py")


@pytest.fixture(scope="module")
def floor(echo: Echo) -> Iterator[int]:
    port = free_port()
    cmd = [sys.executable, FLOOR, "--port", str(port), "--upstream", echo.url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc)
        yield port
    finally:
        stop(proc)


async def test_floor_forwards_method_target_body_and_headers(floor: int) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://127.0.0.1:{floor}/plain/x?a=1", data=b"z" * 1000, headers={"X-Probe": "yes"}
        ) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("application/json")  # the upstream's
        seen = await r.json()
    assert (seen["method"], seen["path"], seen["query"]) == ("POST", "/plain/x", "a=1")
    assert seen["body_bytes"] == 1000
    assert ["X-Probe", "yes"] in seen["headers"]


def test_floor_refuses_the_pure_python_parser(echo: Echo) -> None:
    port = free_port()
    done = subprocess.run(
        [sys.executable, FLOOR, "--port", str(port), "--upstream", echo.url],
        env={**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "without its C extensions" in done.stderr
