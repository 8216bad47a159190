"""Throwaway Postgres and Redis servers for tests: own temp dir, random loopback port.

Why hand-written rather than pytest-postgresql / pytest-redis / mirakuru: the fault tests need
stop, start again on the SAME port and data directory, and SIGKILL of a server (Postgres with all
its backends), and this machine runs tests as root, where Postgres refuses to start; the plugins
either lack those verbs or bring their own fixture model. Plain subprocesses do all of it in one
small file with no extra dependency.

Nothing here touches a system service: each server listens on 127.0.0.1 only (Postgres's unix
socket lives in the temp dir), on a port picked free at first start and kept for restarts.
Readiness is a deadline poll speaking each server's own protocol (Postgres startup packet, Redis
PING), never a fixed sleep. Everything is synchronous and independent of any event loop, so it can
be called from sync fixtures; async tests should use the ``a*`` variants (run in a thread) so that
the proxy under test keeps running on the loop while a server stops or starts.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import asyncpg
import psutil

__all__ = ["MissingBinaryError", "PostgresServer", "RedisServer", "find_postgres_bindir"]

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
_POLL_S = 0.02

_LIVE: weakref.WeakSet[_Server] = weakref.WeakSet()


@dataclass(frozen=True, slots=True)
class _Identity:
    """Popen's user/group/extra_groups/env; all None means "inherit ours"."""

    uid: int | None = None
    gid: int | None = None
    extra_groups: list[int] | None = None
    env: dict[str, str] | None = None


class MissingBinaryError(RuntimeError):
    """A server binary is not installed; the message names the Debian package to install."""


def find_postgres_bindir() -> Path:
    """The bin directory of the newest installed PostgreSQL (needs ``initdb`` and ``postgres``).

    ``EDGE_TEST_PG_BINDIR`` overrides; then Debian's ``/usr/lib/postgresql/<major>/bin``, newest
    major first; then ``pg_config --bindir``; then ``initdb`` on PATH.
    """
    candidates: list[Path] = []
    override = os.environ.get("EDGE_TEST_PG_BINDIR")
    if override:
        candidates.append(Path(override))

    def major(path: str) -> int:
        match = re.search(r"/postgresql/(\d+)/bin$", path)
        return int(match.group(1)) if match else -1

    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True)
    candidates.extend(Path(p) for p in debian)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if all(os.access(bindir / exe, os.X_OK) for exe in ("initdb", "postgres")):
            return bindir
    raise MissingBinaryError(
        "PostgreSQL server binaries (initdb, postgres) not found in /usr/lib/postgresql/*/bin, "
        "`pg_config --bindir` or PATH: install the Debian package `postgresql` "
        "(scripts/ensure-test-servers.sh does it) or set EDGE_TEST_PG_BINDIR"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _world_traversable(path: Path) -> bool:
    """Whether an unprivileged user can reach ``path`` (every ancestor has o+x)."""
    for part in [path, *path.parents]:
        try:
            if not part.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


class _Server:
    """Process bookkeeping shared by both servers; subclasses say how to spawn and probe."""

    name = "server"

    def __init__(self, prefix: str) -> None:
        base = Path(tempfile.gettempdir())
        if os.geteuid() == 0 and not _world_traversable(base):
            base = Path("/tmp")  # the unprivileged server user must be able to reach its dir
        self.tmpdir = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        self.port = 0  # chosen at first start, then kept so clients can reconnect
        self.log_path = self.tmpdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        _LIVE.add(self)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start (again) and return once it answers; the port is kept across restarts."""
        with self._lock:
            if self.running:
                return
            self._reap()
            first = self.port == 0
            attempts = 3 if first else 1  # a fresh random port can lose a race; a kept one cannot
            for attempt in range(attempts):
                if first:
                    self.port = _free_port()
                try:
                    self._spawn_and_wait()
                    return
                except RuntimeError:
                    self._kill_group()
                    if attempt == attempts - 1:
                        raise

    def stop(self) -> None:
        """Graceful shutdown (Postgres: fast shutdown, clients disconnected); waits for exit."""
        with self._lock:
            if self._proc is None:
                return
            if self._proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.send_signal(self._stop_signal())
                    self._signal_tree(signal.SIGCONT)  # in case a test paused it
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=STOP_TIMEOUT_S)
            self._kill_group()

    def kill(self) -> None:
        """SIGKILL the server and every process it started (a crash, no shutdown at all)."""
        with self._lock:
            self._kill_group()

    def _signal_tree(self, sig: int) -> None:
        # Postgres backends call setsid() at start (so signals to the postmaster do not reach
        # them): a process-group signal stops the postmaster only, and already-open connections
        # would keep answering. Signal every descendant as well.
        if self._proc is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self._proc.pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(sig)

    def pause(self) -> None:
        """SIGSTOP the server and every process it started: connections are still accepted
        by the kernel (backlog) but nothing is ever answered, on new or open connections."""
        with self._lock:
            self._signal_tree(signal.SIGSTOP)

    def resume(self) -> None:
        with self._lock:
            self._signal_tree(signal.SIGCONT)

    def cleanup(self) -> None:
        """Kill the server and delete its temp dir; the object is unusable afterwards."""
        self.kill()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        _LIVE.discard(self)

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # -- internals ---------------------------------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _identity(self) -> _Identity:
        """Who the server process runs as: by default, whoever runs the tests."""
        return _Identity()

    def _stop_signal(self) -> int:
        return signal.SIGTERM

    def _ready(self) -> bool:
        raise NotImplementedError

    def _spawn_and_wait(self) -> None:
        who = self._identity()
        with open(self.log_path, "ab") as log:
            # Own session/process group: SIGKILL reaches every backend, and ^C in the terminal
            # running pytest does not reach the server before the fixtures' teardown does.
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=who.uid,
                group=who.gid,
                extra_groups=who.extra_groups,
                env=who.env,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self._proc.returncode} while starting "
                    f"on port {self.port}:\n{self._log_tail()}"
                )
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} not ready on port {self.port} within {START_TIMEOUT_S}s:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(_POLL_S)

    def _kill_group(self) -> None:
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT_S)
        # Backends are children of the server, not ours: wait until the whole group is gone so a
        # restart never meets a still-attached shared-memory segment or a held port.
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(_POLL_S)
        self._proc = None

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._kill_group()

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class PostgresServer(_Server):
    """``initdb`` + ``postgres`` in a temp dir; superuser ``postgres``, trust auth, fsync off.

    Postgres refuses to run as root; as root the server runs as the ``postgres`` system user
    (created by the Debian package) and the temp dir is handed to it.
    """

    name = "postgres"

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir if bindir is not None else find_postgres_bindir()
        super().__init__("edge-pg-")
        self.datadir = self.tmpdir / "data"
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            user = os.environ.get("EDGE_TEST_PG_USER", "postgres")
            try:
                self._run_as = pwd.getpwnam(user)
            except KeyError as exc:
                self.cleanup()
                raise MissingBinaryError(
                    f"running as root, Postgres needs an unprivileged user `{user}` "
                    "(created by the Debian package `postgresql`; or set EDGE_TEST_PG_USER)"
                ) from exc
            os.chown(self.tmpdir, self._run_as.pw_uid, self._run_as.pw_gid)
            os.chmod(self.tmpdir, 0o700)
        self._initdb()

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name`` (from ``template1``) and return its DSN."""
        self._sql(f"CREATE DATABASE {_quote_ident(name)}")
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop it even if clients are still connected (``WITH (FORCE)``, PostgreSQL 13+)."""
        self._sql(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")

    def _sql(self, statement: str) -> None:
        # Runs asyncpg on a private loop in a worker thread: works whether or not the caller's
        # thread is already inside a running event loop.
        async def run() -> None:
            conn = await asyncpg.connect(self.dsn, timeout=10)
            try:
                await conn.execute(statement)
            finally:
                await conn.close()

        errors: list[BaseException] = []

        def target() -> None:
            try:
                asyncio.run(run())
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=target, name="pg-admin")
        worker.start()
        worker.join()
        if errors:
            raise errors[0]

    def _identity(self) -> _Identity:
        if self._run_as is None:
            return _Identity()
        # What `runuser -u postgres` does, minus the extra process: setgroups([]) drops root's
        # supplementary groups, then setgid/setuid; HOME/USER follow so nothing reads root's.
        account = self._run_as
        env = {
            **os.environ,
            "HOME": account.pw_dir,
            "USER": account.pw_name,
            "LOGNAME": account.pw_name,
        }
        return _Identity(uid=account.pw_uid, gid=account.pw_gid, extra_groups=[], env=env)

    def _initdb(self) -> None:
        who = self._identity()
        cmd = [
            str(self.bindir / "initdb"),
            "--pgdata",
            str(self.datadir),
            "--username",
            "postgres",
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
        ]
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=self.tmpdir,
            user=who.uid,
            group=who.gid,
            extra_groups=who.extra_groups,
            env=who.env,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            self.cleanup()
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{output}")

    def _command(self) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.tmpdir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "logging_collector": "off",
            "log_min_messages": "warning",
            "timezone": "UTC",
            # Lets tests count the queries the proxy really made (pg_stat_statements.calls).
            "shared_preload_libraries": "pg_stat_statements",
        }
        cmd = [str(self.bindir / "postgres"), "-D", str(self.datadir)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        return cmd

    def _stop_signal(self) -> int:
        return signal.SIGINT  # "fast" shutdown: disconnect clients, checkpoint, exit

    def _ready(self) -> bool:
        """Send a startup packet; ``R`` (AuthenticationOk under trust) means it takes queries.

        A bare TCP connect is not enough: during start-up and crash recovery the postmaster
        already listens but answers ``E`` ("the database system is starting up").
        """
        payload = b"user\0postgres\0database\0postgres\0\0"
        packet = struct.pack("!ii", 8 + len(payload), 196608) + payload  # protocol 3.0
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(packet)
                first = sock.recv(1)
                if first == b"R":
                    sock.sendall(b"X\0\0\0\4")  # Terminate, so the server logs no EOF
        except OSError:
            return False
        return first == b"R"


class RedisServer(_Server):
    """``redis-server`` on 127.0.0.1 with persistence off, in a temp dir."""

    name = "redis"

    def __init__(self, binary: str | None = None) -> None:
        found = binary or shutil.which("redis-server")
        if not found:
            raise MissingBinaryError(
                "redis-server not found on PATH: install the Debian package `redis-server` "
                "(scripts/ensure-test-servers.sh does it)"
            )
        self.binary = found
        super().__init__("edge-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.tmpdir),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                answer = sock.recv(64)
        except OSError:
            return False
        return answer.startswith(b"+PONG")


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@atexit.register
def _kill_leftovers() -> None:
    """Last resort if a session dies before its fixtures' teardown: leave no servers behind."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.cleanup()
