"""Real processes for e2e tests: the proxy and the echo upstream, on free loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEMO_KEY = "fr_live_DemoAcmeKey0123456789abcdefghijklmnop"
DEMO_TEST_KEY = "fr_test_DemoAcmeTestKey0123456789abcdefghijk"
ACME_ID = "6f1c1f9e-8a51-4d7e-9a44-2b7c0d9c1a01"
DEFAULT_ID = "00000000-0000-0000-0000-000000000001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes], deadline_s: float = 15.0) -> None:
    """Poll until something accepts on ``port``; fail fast if the process died."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode}: {out}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {port} after {deadline_s}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Echo:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_echo() -> Echo:
    port = free_port()
    # Output to a file: a pipe nobody reads would fill up and block the echo upstream.
    log = Path(tempfile.mkstemp(prefix="edge-echo-", suffix=".log")[1])
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "loadtests" / "echo_upstream.py"), "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_port(port, proc)
    return Echo(port, proc)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_config(
    path: Path,
    *,
    upstreams: Mapping[str, Mapping[str, Any]],
    routes: list[Mapping[str, Any]],
    server: Mapping[str, Any] | None = None,
    tenancy: Mapping[str, Any] | None = None,
    domains: Mapping[str, Any] | None = None,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """``sections``: further tables by name (``{"webhooks": {...}}``)."""
    lines = ["[server]"] + [f"{k} = {_toml(v)}" for k, v in (server or {}).items()]
    tenancy = {"embedded_file": str(ROOT / "config" / "tenants.toml"), **(tenancy or {})}
    lines += ["[tenancy]"] + [f"{k} = {_toml(v)}" for k, v in tenancy.items()]
    # No test resolves a name through the machine's resolver (CONTRACT §12): the domain
    # verifier is off unless a test turns it on and points it at the loopback DNS server.
    domains = {"verify": False} if domains is None else domains
    lines += ["[domains]"] + [f"{k} = {_toml(v)}" for k, v in domains.items()]
    for name, up in upstreams.items():
        lines += [f'[upstreams."{name}"]'] + [f"{k} = {_toml(v)}" for k, v in up.items()]
    for route in routes:
        lines += ["[[routes]]"] + [f"{k} = {_toml(v)}" for k, v in route.items()]
    for name, table in (sections or {}).items():
        lines += [f"[{name}]"] + [f"{k} = {_toml(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Proxy:
    port: int
    admin_port: int
    proc: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None  # where its stdout/stderr go (None: a pipe)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """Stop the proxy and return everything it printed."""
        stop(self.proc)
        if self.log is not None:
            return self.log.read_text(errors="replace")
        return self.proc.stdout.read().decode() if self.proc.stdout else ""


def wait_ready(admin_port: int, deadline_s: float = 10.0) -> None:
    """Poll /readyz until 200 (in database mode: Postgres answers and LISTEN is up)."""
    import urllib.error
    import urllib.request

    end = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"proxy not ready after {deadline_s}s")
        time.sleep(0.02)


def start_proxy(
    config: Path,
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    pipe: bool = False,
    port: int | None = None,
) -> Proxy:
    """A proxy process. Its output goes to a file read by ``output()``: a pipe read only at
    the end would fill up with access-log lines (``pipe=True`` asks for exactly that).
    ``port``: the public port, when the configuration must name it before the start."""
    port, admin = port or free_port(), free_port()
    log = Path(tempfile.mkstemp(prefix="edge-proxy-", suffix=".log")[1])
    full_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    full_env.update(env or {})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin}",
            *args,
        ],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE if pipe else log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_port(admin, proc)
    wait_port(port, proc)
    wait_ready(admin)
    return Proxy(port, admin, proc, dict(env or {}), None if pipe else log)


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def _recv_response(s: socket.socket) -> bytes:
    """Read one response: up to its Content-Length, its last chunk, or the server's close."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = s.recv(65536)
        if not chunk:
            return raw
        raw += chunk
    head = raw.partition(b"\r\n\r\n")[0].lower()
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.startswith(b"content-length:")
        ),
        None,
    )
    while True:
        body = raw.partition(b"\r\n\r\n")[2]
        if length is not None and len(body) >= length:
            return raw
        if b"transfer-encoding: chunked" in head and body.endswith(b"0\r\n\r\n"):
            return raw
        chunk = s.recv(65536)
        if not chunk:
            return raw
        raw += chunk


def raw_request(
    port: int, data: bytes, *, source: str = "127.0.0.1", timeout: float = 10.0
) -> RawResponse:
    """Send exact bytes and parse the one response that comes back (CL, chunked or close)."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    ) as s:
        s.sendall(data)
        raw = _recv_response(s)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in lines[1:])]
    if any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers):
        decoded, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2 :]
        body = decoded
    return RawResponse(status, headers, body)
