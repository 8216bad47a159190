"""Measure the rate limiter's Redis deadline instead of guessing it (issue 5).

Runs the real proxy app in this process against a throwaway, healthy Redis with a very
generous deadline, drives bursts of concurrent keyed requests at it from a separate process,
and reports the slowest Redis round trip the limiter saw per burst, event-loop lag included:
the time a deadline would have to allow so that a healthy Redis is never mistaken for a dead
one (which, fail-open, means over-admission).

    .venv/bin/python loadtests/limiter_deadline.py [--bursts 100,300,600,1000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
import textwrap
import time
from dataclasses import replace
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.app import build_app, build_stores, runner_kwargs  # noqa: E402
from proxy.settings import load_settings, parse_host_port  # noqa: E402
from proxy.stores.redis import RedisBucketStore  # noqa: E402
from tests.procs import free_port, start_echo, stop  # noqa: E402
from tests.servers import RedisServer  # noqa: E402

KEY = "fr_live_" + "D" * 40
LOADGEN = textwrap.dedent(
    """
    import asyncio, sys, aiohttp
    async def main(url, host, key, n):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            async def one():
                async with s.get(url, headers={"Host": host, "X-API-Key": key}) as r:
                    await r.read()
            await asyncio.gather(*(one() for _ in range(n)))
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
    """
)


def _write_config(tmp: Path, echo_url: str) -> Path:
    tenants = tmp / "tenants.toml"
    tenants.write_text(
        '[[tenants]]\nid = "eeeeeeee-0000-0000-0000-000000000001"\nslug = "acme"\n'
        'status = "Active"\ncustom_domain = "videos.acme.test"\ndomain_verified = true\n\n'
        '[[keys]]\nid = "eeeeeeee-0000-0000-0000-0000000000aa"\ntenant = "acme"\n'
        f'key_prefix = "{KEY[:12]}"\nkey_hash = "{hashlib.sha256(KEY.encode()).hexdigest()}"\n'
        'scopes = ["*"]\nrate_limit_rpm = 100000000\n'
    )
    config = tmp / "edge.toml"
    config.write_text(
        f'[tenancy]\nembedded_file = "{tenants}"\n[ratelimit]\ntimeout_ms = 10000\n'
        # The proxy runs in this process: its access log would bury the table on stdout.
        "[telemetry]\naccess_log = false\n"
        f'[upstreams.up]\nurls = ["{echo_url}"]\n'
        '[[routes]]\nprefix = "/v1"\nupstream = "up"\nauth = "api_key"\n'
    )
    return config


async def run(bursts: list[int]) -> None:
    redis = RedisServer()
    redis.start()
    echo = start_echo()
    try:
        with tempfile.TemporaryDirectory() as d:
            config = _write_config(Path(d), echo.url)
            settings = load_settings({"REDIS_URL": redis.url}, str(config))
            port = free_port()
            settings = replace(
                settings,
                server=replace(settings.server, listen=parse_host_port(f"127.0.0.1:{port}", "")),
            )
            stores = build_stores(settings)
            assert isinstance(stores.buckets, RedisBucketStore)
            runner = web.AppRunner(build_app(settings, stores), **runner_kwargs(settings))  # type: ignore[arg-type]
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            url = f"http://127.0.0.1:{port}/v1/x"
            print(f"{'burst':>6} {'wall s':>7} {'slowest redis call ms':>22} {'commands':>9}")
            for n in bursts:
                stores.buckets.slowest_call_s = 0.0
                before = stores.buckets.commands_sent
                started = time.monotonic()
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    LOADGEN,
                    url,
                    "videos.acme.test",
                    KEY,
                    str(n),
                    env={**os.environ},
                )
                await proc.wait()
                wall = time.monotonic() - started
                slowest = stores.buckets.slowest_call_s * 1000
                sent = stores.buckets.commands_sent - before
                print(f"{n:>6} {wall:>7.2f} {slowest:>22.1f} {sent:>9}")
                assert stores.buckets.degraded_decisions == 0
            await runner.cleanup()
    finally:
        stop(echo.proc)
        redis.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", default="100,300,600,1000")
    args = parser.parse_args()
    import uvloop

    uvloop.run(run([int(b) for b in args.bursts.split(",")]))


if __name__ == "__main__":
    main()
