"""Measures the lean upstream transport experiment (loadtests/lean_transport.py): plain
forwarding (a route with every feature off) through the product's ClientSession path, through
the lean transport, and aiohttp's floor, in interleaved wrk rounds, the three pinned to the same
core; prints req/s and proxy CPU per request per round, their medians and the spread.

    .venv/bin/python loadtests/lean_bench.py [--seconds 3] [--rounds 6] [--connections 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import (
    HOST,
    LOAD_CORE,
    PROXY_CORE,
    ensure_wrk,
    pinned,
    process_cpu_s,
    run_wrk,
)

from tests.procs import free_port, stop, wait_port, wait_ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    wrk = ensure_wrk()
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="edge-lean-"))
    procs = []
    try:
        up = free_port()
        procs.append(pinned(LOAD_CORE, py, "loadtests/fast_upstream.py", "--port", str(up)))
        wait_port(up, procs[-1])
        floor = free_port()
        cmd = ["loadtests/floor_forwarder.py", "--port", str(floor)]
        procs.append(pinned(PROXY_CORE, py, *cmd, "--upstream", f"http://127.0.0.1:{up}"))
        wait_port(floor, procs[-1])
        config = tmp / "edge.toml"
        config.write_text(
            f'[upstreams.fast]\nurls = ["http://127.0.0.1:{up}"]\n'
            '[[routes]]\nprefix = "/plain"\nupstream = "fast"\nauth = "none"\n'
        )
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
        pids = {"floor": procs[1].pid}
        ports = {"floor": floor}
        for name, entry in (
            ("session", ["-m", "proxy"]),
            ("lean", ["loadtests/lean_transport.py"]),
        ):
            port, admin = free_port(), free_port()
            serve = ["serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"]
            serve += ["--admin-listen", f"127.0.0.1:{admin}"]
            log = tmp / f"{name}.log"
            procs.append(pinned(PROXY_CORE, py, *entry, *serve, env=env, log=log))
            wait_port(port, procs[-1])
            wait_ready(admin)
            pids[name], ports[name] = procs[-1].pid, port
        rps: dict[str, list[float]] = {n: [] for n in ports}
        cpu: dict[str, list[float]] = {n: [] for n in ports}
        for port in ports.values():  # warm-up
            run_wrk(wrk, f"http://127.0.0.1:{port}/plain/x", 1, args.connections, [f"Host: {HOST}"])
        for _ in range(args.rounds):
            for name, port in ports.items():
                before = process_cpu_s(pids[name])
                url = f"http://127.0.0.1:{port}/plain/x"
                r = run_wrk(wrk, url, args.seconds, args.connections, [f"Host: {HOST}"])
                if r.errors:
                    sys.exit(f"lean_bench: {r.errors} errors from {name}")
                rps[name].append(r.rps)
                cpu[name].append((process_cpu_s(pids[name]) - before) / r.requests * 1e6)
        print(
            f"lean transport: {args.rounds} interleaved rounds x {args.seconds}s, "
            f"{args.connections} connections, all three on core {PROXY_CORE}"
        )
        print("scenario   req/s median (min-max)     CPU us/req median (min-max)")
        for name in ports:
            r, c = rps[name], cpu[name]
            print(
                f"{name:8} {statistics.median(r):7.0f} ({min(r):.0f}-{max(r):.0f})"
                f"   {statistics.median(c):7.0f} ({min(c):.0f}-{max(c):.0f})"
            )
        med = {n: statistics.median(v) for n, v in rps.items()}
        mcpu = {n: statistics.median(v) for n, v in cpu.items()}
        for name in ("session", "lean"):
            print(
                f"plain/floor with {name}: {med[name] / med['floor']:.2f} by req/s, "
                f"{mcpu['floor'] / mcpu[name]:.2f} by CPU per request"
            )
        per_round = [f / s for f, s in zip(cpu["session"], cpu["lean"], strict=True)]
        print(
            "session/lean CPU per request, per round: " + ", ".join(f"{x:.2f}" for x in per_round)
        )
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
