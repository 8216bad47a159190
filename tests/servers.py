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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Self, TypeAlias, TypeVar

import asyncpg
import psutil

__all__ = [
    "MissingBinaryError",
    "PostgresServer",
    "RedisClusterServer",
    "RedisSentinelSet",
    "RedisServer",
    "find_postgres_bindir",
]

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
_POLL_S = 0.02

_LIVE: weakref.WeakSet[_Server] = weakref.WeakSet()
_T = TypeVar("_T", bound="_Server")


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
                    self.port = self._pick_port()
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

    def _pick_port(self) -> int:
        """The port for a first start (a subclass may need more free ports alongside it)."""
        return _free_port()

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
        # Postgres backends setsid() (their own sessions and groups), so the group signal alone
        # leaves them running, attached to shared memory, and a restart on the same data
        # directory then fails. Kill every descendant too, and wait until all are gone.
        tree: list[psutil.Process] = []
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = psutil.Process(proc.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for child in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT_S)
        psutil.wait_procs(tree, timeout=STOP_TIMEOUT_S)
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


# -- Redis topologies: Cluster and Sentinel ---------------------------------------------------

CLUSTER_SLOTS = 16384
FAILOVER_TIMEOUT_S = 15.0

_Resp: TypeAlias = bytes | int | list["_Resp"] | None


class _RedisReplyError(RuntimeError):
    """The server answered with a RESP error (``-ERR ...``, ``-LOADING ...``)."""


def _read_resp(reader: BinaryIO) -> _Resp:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed mid-reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise _RedisReplyError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("connection closed mid-reply")
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_resp(reader) for _ in range(count)]
    raise ConnectionError(f"unexpected RESP reply {line!r}")


def _redis_calls(port: int, *commands: Sequence[str], timeout_s: float = 1.0) -> list[_Resp]:
    """Commands pipelined on one fresh loopback connection, RESP2, no client library: the
    harness must not depend on the code under test, and it runs in any thread, inside a loop or
    not. A RESP error reply raises :class:`_RedisReplyError`."""
    parts: list[bytes] = []
    for args in commands:
        parts.append(f"*{len(args)}\r\n".encode())
        for arg in args:
            raw = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(b"".join(parts))
        with sock.makefile("rb") as reader:
            return [_read_resp(reader) for _ in commands]


def _redis_call(port: int, *args: str, timeout_s: float = 1.0) -> _Resp:
    """One command on a fresh loopback connection (see :func:`_redis_calls`)."""
    return _redis_calls(port, args, timeout_s=timeout_s)[0]


def _redis_fields(port: int, *args: str) -> dict[str, str] | None:
    """``INFO``-style ``key:value`` lines as a dict; None if the server does not answer."""
    try:
        reply = _redis_call(port, *args)
    except (OSError, ValueError, _RedisReplyError):
        return None
    if not isinstance(reply, bytes):
        return None
    fields: dict[str, str] = {}
    for line in reply.decode(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _deadline_poll(check: Callable[[], bool], timeout_s: float, what: Callable[[], str]) -> None:
    """Call ``check`` until it is true; RuntimeError with ``what()`` once ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout_s}s: {what()}")
        time.sleep(_POLL_S)


def _redis_cli() -> str:
    found = shutil.which("redis-cli")
    if not found:
        raise MissingBinaryError(
            "redis-cli not found on PATH: install the Debian package `redis-tools` "
            "(a dependency of `redis-server`; scripts/ensure-test-servers.sh installs it)"
        )
    return found


class _RedisClusterNode(RedisServer):
    """One cluster-mode ``redis-server``; its cluster bus gets its own free port (``cluster-port``,
    Redis 7+) instead of the default port+10000, which may be taken or above 65535."""

    name = "redis-cluster-node"

    def __init__(self, binary: str | None = None) -> None:
        super().__init__(binary)
        self.bus_port = 0

    def _pick_port(self) -> int:
        port = _free_port()
        self.bus_port = _free_port()
        while self.bus_port == port:
            self.bus_port = _free_port()
        return port

    @property
    def nodes_conf(self) -> Path:
        return self.tmpdir / f"nodes-{self.port}.conf"

    def _command(self) -> list[str]:
        return [
            *super()._command(),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.nodes_conf),
            "--cluster-port",
            str(self.bus_port),
            "--cluster-node-timeout",
            "2000",
        ]


class RedisClusterServer:
    """A real Redis Cluster: ``masters`` cluster-mode masters (no replicas) on free loopback ports,
    joined by ``redis-cli --cluster create``, every slot assigned.

    Each node is a :class:`RedisServer` with its own temp dir (``nodes-PORT.conf`` lives there and
    survives restarts, so a restarted node rejoins with the same id and slots but empty data:
    persistence is off). Nodes register with the harness like every server, so the atexit
    clean-up kills them too.
    """

    name = "redis-cluster"

    def __init__(self, masters: int = 3, binary: str | None = None) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.cli = _redis_cli()
        self.servers: list[RedisServer] = []
        try:
            for _ in range(masters):
                self.servers.append(_RedisClusterNode(binary))
        except BaseException:
            self.cleanup()
            raise
        self.created = False
        self._lock = threading.RLock()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every node, in index order (ports are 0 before the first start)."""
        return [("127.0.0.1", server.port) for server in self.servers]

    @property
    def url(self) -> str:
        """A startup URL for cluster clients: node 0 (any node would do while it runs)."""
        return f"redis://127.0.0.1:{self.servers[0].port}"

    @property
    def running(self) -> bool:
        return all(server.running for server in self.servers)

    def node_for_slot(self, slot: int) -> tuple[str, int]:
        """Which node serves ``slot`` right now, from ``CLUSTER SLOTS`` of a running node."""
        for server in self.servers:
            if not server.running:
                continue
            try:
                reply = _redis_call(server.port, "CLUSTER", "SLOTS")
            except (OSError, ValueError, _RedisReplyError):
                continue
            for entry in reply if isinstance(reply, list) else []:
                if not isinstance(entry, list) or len(entry) < 3:
                    continue
                first, last, master = entry[0], entry[1], entry[2]
                if not (isinstance(first, int) and isinstance(last, int)):
                    continue
                if first <= slot <= last and isinstance(master, list) and len(master) >= 2:
                    port = master[1]
                    if isinstance(port, int):
                        return ("127.0.0.1", port)
        raise RuntimeError(f"no running node of the cluster reports an owner for slot {slot}")

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, index: int | None = None, *, wait: bool = True) -> None:
        """Start one node (``index``) or all of them, on their kept ports.

        The first call starts every node whatever ``index`` says and creates the cluster. With
        ``wait`` (and every node running afterwards) it returns once the cluster is healthy, see
        :meth:`wait_healthy`; after a node was down for more than the node timeout (2 s) that can
        take a few seconds, until the others clear its FAIL flag.
        """
        with self._lock:
            targets = self.servers if index is None or not self.created else [self.servers[index]]
            for server in targets:
                server.start()
            if not self.created:
                self._create()
                self.created = True
            if wait and self.running:
                self.wait_healthy()

    def stop(self, index: int | None = None) -> None:
        """Graceful shutdown of one node or all of them; data is gone, ``nodes-*.conf`` is not."""
        for server in self._targets(index):
            server.stop()

    def kill_node(self, index: int) -> None:
        """SIGKILL one node (a crash); :meth:`start` with the same index brings it back."""
        self.servers[index].kill()

    def kill(self, index: int | None = None) -> None:
        for server in self._targets(index):
            server.kill()

    def pause_node(self, index: int) -> None:
        self.servers[index].pause()

    def resume_node(self, index: int) -> None:
        self.servers[index].resume()

    def cleanup(self) -> None:
        """Kill every node and delete the temp dirs; the object is unusable afterwards."""
        for server in self.servers:
            server.cleanup()

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until every node reports ``cluster_state:ok``, all 16384 slots assigned and ok (no
        PFAIL/FAIL anywhere) and knows every node."""
        states: dict[int, dict[str, str] | None] = {}

        def healthy() -> bool:
            for server in self.servers:
                states[server.port] = _redis_fields(server.port, "CLUSTER", "INFO")
            return all(self._node_healthy(info) for info in states.values())

        def what() -> str:
            summary = {
                port: {k: v for k, v in (info or {}).items() if k.startswith("cluster_")}
                for port, info in states.items()
            }
            return f"{self.name} not healthy: {summary}"

        _deadline_poll(healthy, timeout_s, what)

    async def astart(self, index: int | None = None, *, wait: bool = True) -> None:
        await asyncio.to_thread(self.start, index, wait=wait)

    async def astop(self, index: int | None = None) -> None:
        await asyncio.to_thread(self.stop, index)

    async def akill_node(self, index: int) -> None:
        await asyncio.to_thread(self.kill_node, index)

    async def await_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        await asyncio.to_thread(self.wait_healthy, timeout_s)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # -- internals ---------------------------------------------------------------------------

    def _targets(self, index: int | None) -> list[RedisServer]:
        return self.servers if index is None else [self.servers[index]]

    def _node_healthy(self, info: dict[str, str] | None) -> bool:
        if info is None:
            return False
        return (
            info.get("cluster_state") == "ok"
            and info.get("cluster_slots_assigned") == str(CLUSTER_SLOTS)
            and info.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
            and info.get("cluster_known_nodes") == str(len(self.servers))
        )

    def _create(self) -> None:
        cmd = [self.cli, "--cluster", "create"]
        cmd += [f"{host}:{port}" for host, port in self.nodes]
        cmd += ["--cluster-replicas", "0", "--cluster-yes"]
        try:
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_S * 2,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"`{' '.join(cmd)}` hung:\n{exc.output!r}") from exc
        if result.returncode != 0 or "[OK] All 16384 slots covered" not in result.stdout:
            logs = "\n".join(f"--- node {s.port}:\n{s._log_tail()}" for s in self.servers)
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n{logs}"
            )


class _RedisDataNode(RedisServer):
    """Master or replica of a :class:`RedisSentinelSet`: ``replicaof`` is read at every start,
    so a restarted server comes back in the role the set currently gives it."""

    name = "redis-data"

    def __init__(self, binary: str | None = None) -> None:
        super().__init__(binary)
        self.replicaof: int | None = None

    def _command(self) -> list[str]:
        # No 5 s wait before the first full sync (the default for diskless replication).
        cmd = [*super()._command(), "--repl-diskless-sync-delay", "0"]
        if self.replicaof is not None:
            cmd += ["--replicaof", "127.0.0.1", str(self.replicaof)]
        return cmd

    def replication(self) -> dict[str, str] | None:
        return _redis_fields(self.port, "INFO", "replication")


class _RedisSentinelProcess(_Server):
    """``redis-server <conf> --sentinel``; the config file is written at the first start (the
    sentinel rewrites it as it learns, so restarts keep what it knows)."""

    name = "redis-sentinel"

    def __init__(self, binary: str, service: str) -> None:
        self.binary = binary
        self.service = service
        self.monitor_port = 0
        self._conf_port = 0
        super().__init__("edge-sentinel-")
        self.conf_path = self.tmpdir / "sentinel.conf"

    def _command(self) -> list[str]:
        if self._conf_port != self.port:  # first start (or a retry on a fresh port)
            svc = self.service
            self.conf_path.write_text(
                f"port {self.port}\n"
                "bind 127.0.0.1\n"
                "daemonize no\n"
                f'dir "{self.tmpdir}"\n'
                "loglevel notice\n"
                "sentinel resolve-hostnames no\n"
                f"sentinel monitor {svc} 127.0.0.1 {self.monitor_port} 1\n"
                f"sentinel down-after-milliseconds {svc} 1000\n"
                f"sentinel failover-timeout {svc} 3000\n"
            )
            self._conf_port = self.port
        return [self.binary, str(self.conf_path), "--sentinel"]

    def _ready(self) -> bool:
        try:
            return _redis_call(self.port, "PING") == b"PONG"
        except (OSError, ValueError, _RedisReplyError):
            return False

    def master_address(self) -> tuple[str, int] | None:
        """``SENTINEL get-master-addr-by-name``; None if unknown or the sentinel is down."""
        try:
            reply = _redis_call(self.port, "SENTINEL", "get-master-addr-by-name", self.service)
        except (OSError, ValueError, _RedisReplyError):
            return None
        if isinstance(reply, list) and len(reply) == 2:
            host, port = reply
            if isinstance(host, bytes) and isinstance(port, bytes):
                return host.decode(), int(port)
        return None

    def master_flags(self) -> set[str] | None:
        """The ``flags`` of ``SENTINEL master`` (``{"master"}`` when all is well; also
        ``s_down``, ``o_down``, ``disconnected``, ``failover_in_progress``); None if unknown."""
        try:
            reply = _redis_call(self.port, "SENTINEL", "master", self.service)
        except (OSError, ValueError, _RedisReplyError):
            return None
        if not isinstance(reply, list):
            return None
        flat = [x.decode() if isinstance(x, bytes) else str(x) for x in reply]
        flags = dict(zip(flat[::2], flat[1::2], strict=False)).get("flags")
        return None if flags is None else set(flags.split(","))

    def replicas(self) -> list[dict[str, str]]:
        """``SENTINEL replicas``: one dict (``ip``, ``port``, ``flags``, ...) per replica."""
        try:
            reply = _redis_call(self.port, "SENTINEL", "replicas", self.service)
        except (OSError, ValueError, _RedisReplyError):
            return []
        found: list[dict[str, str]] = []
        for entry in reply if isinstance(reply, list) else []:
            if isinstance(entry, list):
                flat = [x.decode() if isinstance(x, bytes) else str(x) for x in entry]
                found.append(dict(zip(flat[::2], flat[1::2], strict=False)))
        return found


class RedisSentinelSet:
    """One master, one replica (``--replicaof``) and one sentinel watching them as ``service``
    (quorum 1, down after 1 s, failover timeout 3 s), all on free loopback ports.

    After :meth:`kill_master` the sentinel promotes the replica within a few seconds;
    :meth:`wait_for_failover` waits for that and swaps the roles (``master``/``replica`` follow
    the sentinel), and :meth:`heal` restarts the dead server as the new master's replica, so the
    next test again has a master, a synced replica and a sentinel that can fail over. The three
    processes register with the harness like every server (atexit clean-up included).
    """

    name = "redis-sentinel-set"

    def __init__(self, binary: str | None = None, service: str = "edge-master") -> None:
        found = binary or shutil.which("redis-server")
        if not found:
            raise MissingBinaryError(
                "redis-server not found on PATH: install the Debian package `redis-server` "
                "(scripts/ensure-test-servers.sh does it)"
            )
        self.service = service
        self._servers: list[_Server] = []
        try:
            self.master = self._add(_RedisDataNode(found))
            self.replica = self._add(_RedisDataNode(found))
            self.sentinel = self._add(_RedisSentinelProcess(found, service))
        except BaseException:
            self.cleanup()
            raise
        self._lock = threading.RLock()

    def _add(self, server: _T) -> _T:
        self._servers.append(server)
        return server

    # -- addresses ---------------------------------------------------------------------------

    @property
    def sentinel_port(self) -> int:
        return self.sentinel.port

    @property
    def sentinel_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.sentinel.port)

    @property
    def sentinel_url(self) -> str:
        return f"redis://127.0.0.1:{self.sentinel.port}"

    @property
    def master_port(self) -> int:
        """Port of the current master as this object knows it (updated by
        :meth:`wait_for_failover` / :meth:`heal`)."""
        return self.master.port

    @property
    def replica_port(self) -> int:
        return self.replica.port

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start whatever is not running (first call: master, replica, sentinel) and wait until
        the sentinel reports the master and the replica is in sync (see :meth:`wait_ready`)."""
        with self._lock:
            self._sync_roles()
            self.master.replicaof = None
            self.master.start()
            self.replica.replicaof = self.master.port
            self.replica.start()
            if self.sentinel.monitor_port == 0:
                self.sentinel.monitor_port = self.master.port
            self.sentinel.start()
            self.wait_ready(timeout_s)

    heal = start  # after a failover: the old master comes back as the new master's replica

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until the sentinel names our master with no flag but ``master`` (what sentinel
        clients such as redis-py check), the master says ``role:master``, the replica says it is
        linked to it, the sentinel lists the replica without down flags, and a write on the
        master is acknowledged by the replica (``WAIT``)."""

        def ready() -> bool:
            if self.sentinel.master_address() != ("127.0.0.1", self.master.port):
                return False
            if self.sentinel.master_flags() != {"master"}:
                return False  # e.g. "disconnected" for ~1 s after a failover or a restart
            master = self.master.replication()
            replica = self.replica.replication()
            if master is None or master.get("role") != "master" or replica is None:
                return False
            if replica.get("role") != "slave" or replica.get("master_port") != str(
                self.master.port
            ):
                return False
            if replica.get("master_link_status") != "up":
                return False
            if not any(
                entry.get("port") == str(self.replica.port)
                and not {"s_down", "o_down", "disconnected"} & set(entry["flags"].split(","))
                for entry in self.sentinel.replicas()
                if "flags" in entry
            ):
                return False
            return self._replica_acks()

        _deadline_poll(ready, timeout_s, self._describe)

    def kill_master(self) -> tuple[str, int]:
        """SIGKILL the current master; returns its address. The sentinel notices after 1 s."""
        with self._lock:
            self.master.kill()
            return ("127.0.0.1", self.master.port)

    def wait_for_failover(self, timeout_s: float = FAILOVER_TIMEOUT_S) -> tuple[str, int]:
        """Until the sentinel reports a master other than ours (the promoted replica) with no
        flag but ``master`` and that server answers ``role:master``; swaps ``master``/``replica``
        and returns the new master's address. The old master stays down: see :meth:`heal`."""
        with self._lock:
            old = self.master.port

            def promoted() -> bool:
                addr = self.sentinel.master_address()
                if addr is None or addr[1] == old or self.sentinel.master_flags() != {"master"}:
                    return False
                info = _redis_fields(addr[1], "INFO", "replication")
                return info is not None and info.get("role") == "master"

            _deadline_poll(
                promoted, timeout_s, lambda: f"no failover from {old}: {self._describe()}"
            )
            self._sync_roles()
            return ("127.0.0.1", self.master.port)

    def stop(self) -> None:
        for server in self._servers:
            server.stop()

    def kill(self) -> None:
        for server in self._servers:
            server.kill()

    def cleanup(self) -> None:
        """Kill all three processes and delete their temp dirs."""
        for server in self._servers:
            server.cleanup()

    async def astart(self, timeout_s: float = START_TIMEOUT_S) -> None:
        await asyncio.to_thread(self.start, timeout_s)

    aheal = astart

    async def akill_master(self) -> tuple[str, int]:
        return await asyncio.to_thread(self.kill_master)

    async def await_failover(self, timeout_s: float = FAILOVER_TIMEOUT_S) -> tuple[str, int]:
        return await asyncio.to_thread(self.wait_for_failover, timeout_s)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # -- internals ---------------------------------------------------------------------------

    def _replica_acks(self) -> bool:
        """Whether a write on the master reaches the replica now: ``PUBLISH`` (propagated to
        replicas, touches no key) then ``WAIT 1 100`` on the same connection.

        ``master_link_status:up`` is not enough: after a diskless full sync Redis 7 holds the
        command stream back until the replica's first ``REPLCONF ACK``, up to a second later, and
        until then writes are not replicated at all (a kill in that window loses them).
        """
        try:
            replies = _redis_calls(
                self.master.port,
                ("PUBLISH", "__edge_harness__", "replication-probe"),
                ("WAIT", "1", "100"),
            )
        except (OSError, ValueError, _RedisReplyError):
            return False
        return replies[1] == 1

    def _sync_roles(self) -> None:
        """If the sentinel moved the master to our replica, swap the two (idempotent)."""
        addr = self.sentinel.master_address() if self.sentinel.running else None
        if addr is not None and self.replica.port != 0 and addr[1] == self.replica.port:
            self.master, self.replica = self.replica, self.master
            self.master.replicaof = None
            self.replica.replicaof = self.master.port

    def _describe(self) -> str:
        return (
            f"sentinel {self.sentinel.port} reports {self.sentinel.master_address()} "
            f"flags {self.sentinel.master_flags()}, "
            f"replicas {self.sentinel.replicas()}; master {self.master.port} "
            f"{self.master.replication()}; replica {self.replica.port} "
            f"{self.replica.replication()}\n--- sentinel log:\n{self.sentinel._log_tail()}"
        )


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@atexit.register
def _kill_leftovers() -> None:
    """Last resort if a session dies before its fixtures' teardown: leave no servers behind."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.cleanup()
