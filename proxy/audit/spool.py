"""The audit spool: batches waiting on disk while Postgres is unreachable (CONTRACT §9, issue 6).

One file per batch, JSON lines in the format of ``AuditRecord.as_json_row``. Names in
``spool_dir``::

    <time_ns:020>_<seq:08>_<host>_<pid>.jsonl               ready: whole, fsync'd, replayable
    <ready name>.tmp                                        being written by <host>/<pid>
    <ready name>.claimed_<host>_<pid>                       being replayed by that process

Why this shape:

* Written under the ``.tmp`` name, fsync'd, renamed, then the directory fsync'd: a ready file is
  always whole (a reader never sees half a batch) and survives a crash once renamed.
* Names sort by time, so replay goes oldest first.
* A replayer claims a file with rename(2), atomic within one file system: of two processes
  sharing ``spool_dir`` exactly one rename succeeds, the other gets ``FileNotFoundError`` and
  moves on. The caller deletes a file only after its rows committed and renames it back
  (``release``) when they did not.
* Claims avoid double work; they are not what makes replay safe. That is the database's unique
  ``(request_id, created_at)`` index, so a file replayed twice (say, a claim taken over from a
  process that was only slow) still lands once.
* A process killed mid-write or mid-replay leaves ``.tmp`` / ``.claimed`` files behind. They are
  made ready again when their owner is provably gone (same host, pid not running, or our own pid
  at start, inherited from an earlier process), or when untouched for ``stale_after_s`` (an
  owner on another host, which we cannot ask). Of a ``.tmp`` file cut short, the complete lines
  are replayed and the torn one is reported as unreadable.
* The byte cap counts every file in the directory, whoever wrote it: processes sharing a spool
  share its cap.

Everything here is blocking file I/O: the sink calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from proxy.audit.record import AuditRecord

READY = ".jsonl"
TMP = ".tmp"
CLAIMED = ".claimed_"


@dataclass(frozen=True, slots=True)
class Claimed:
    """A spool file this process holds: its records, and how many lines could not be read."""

    path: Path
    ready: Path  # the name it goes back to on release
    records: tuple[AuditRecord, ...]
    unreadable_lines: int


def cannot_use(directory: Path, reason: str) -> str:
    return f"audit.spool_dir: cannot use {directory}: {reason}"


def spool_dir_problem(directory: Path) -> str | None:
    """Why ``Spool.prepare`` would fail on ``directory``, found without creating anything:
    it must be a directory we may list and write, or be creatable (its nearest existing
    ancestor a directory we may write). ``check`` and ``serve`` both ask before starting."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    need = os.R_OK | os.W_OK | os.X_OK if existing == directory else os.W_OK | os.X_OK
    if not existing.is_dir():
        return cannot_use(directory, f"{existing} is not a directory")
    if not os.access(existing, need):
        return cannot_use(directory, f"{existing}: permission denied")
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    return True


class Spool:
    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        *,
        stale_after_s: float = 60.0,
        host: str | None = None,
        pid: int | None = None,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._stale_after = stale_after_s
        # '_' separates the fields of a name: host names never contain it (RFC 1123).
        self._host = (host or socket.gethostname()).replace("_", "-")
        self._fixed_pid = pid
        self._seq = itertools.count()

    @property
    def _pid(self) -> int:
        # Asked each time, not at construction: `serve --workers` forks after building
        # settings, and every worker must sign its files with its own pid.
        return os.getpid() if self._fixed_pid is None else self._fixed_pid

    # -- writing --------------------------------------------------------------------------------

    def prepare(self) -> int:
        """Create the directory and take back what dead processes left; returns files recovered."""
        self.directory.mkdir(parents=True, exist_ok=True)
        return self._recover(at_start=True)

    def size(self) -> int:
        total = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):  # claimed or deleted meanwhile
                    total += entry.stat().st_size
        return total

    def write(self, rows: Sequence[AuditRecord]) -> bool:
        """Append one batch as a new file; ``False`` (nothing written) when it would pass the
        cap. Raises ``OSError`` when the directory is not writable."""
        data = b"".join(orjson.dumps(r.as_json_row()) + b"\n" for r in rows)
        if self.size() + len(data) > self.max_bytes:
            return False
        name = f"{time.time_ns():020d}_{next(self._seq):08d}_{self._host}_{self._pid}{READY}"
        ready = self.directory / name
        tmp = ready.with_name(name + TMP)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, ready)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._sync_directory()
        return True

    def _sync_directory(self) -> None:
        # The rename is durable only once the directory itself is on disk.
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- replaying ------------------------------------------------------------------------------

    def pending(self) -> list[Path]:
        """Ready files, oldest first."""
        return sorted(p for p in self.directory.iterdir() if p.name.endswith(READY))

    def claim_next(self) -> Claimed | None:
        """Claim and read the oldest ready file, or ``None`` when there is none."""
        self._recover(at_start=False)
        for ready in self.pending():
            claimed = ready.with_name(f"{ready.name}{CLAIMED}{self._host}_{self._pid}")
            try:
                os.rename(ready, claimed)
            except FileNotFoundError:
                continue  # another process claimed it first
            os.utime(claimed)  # the claim's lease starts now (see stale_after_s)
            records, unreadable = _read(claimed)
            return Claimed(claimed, ready, records, unreadable)
        return None

    def release(self, claimed: Claimed) -> None:
        """Give a file back (its rows did not commit): any process may replay it later."""
        os.rename(claimed.path, claimed.ready)

    def delete(self, claimed: Claimed) -> None:
        """Forget a file whose rows committed."""
        with contextlib.suppress(FileNotFoundError):
            claimed.path.unlink()

    def _recover(self, *, at_start: bool) -> int:
        recovered = 0
        now = time.time()
        for path in self.directory.iterdir():
            parsed = _owner(path.name)
            if parsed is None:
                continue
            ready_name, host, pid = parsed
            try:
                stale = now - path.stat().st_mtime > self._stale_after
            except FileNotFoundError:
                continue
            if not (stale or self._owner_gone(host, pid, at_start)):
                continue
            with contextlib.suppress(FileNotFoundError):  # someone else recovered it first
                os.rename(path, path.with_name(ready_name))
                recovered += 1
        return recovered

    def _owner_gone(self, host: str, pid_text: str, at_start: bool) -> bool:
        if host != self._host or not pid_text.isdigit():
            return False
        pid = int(pid_text)
        if pid == self._pid:
            # Ours: at start it can only be an earlier process's that had our pid.
            return at_start
        return not _pid_alive(pid)


def _owner(name: str) -> tuple[str, str, str] | None:
    """(ready name, owner host, owner pid) of a ``.tmp`` or ``.claimed`` file, else ``None``."""
    if name.endswith(TMP):
        ready = name.removesuffix(TMP)
        fields = ready.removesuffix(READY).split("_")  # time, seq, host, pid
        return (ready, fields[2], fields[3]) if len(fields) == 4 else None
    ready, sep, owner = name.partition(CLAIMED)
    if not sep:
        return None
    host, _, pid = owner.rpartition("_")
    return ready, host, pid


def _read(path: Path) -> tuple[tuple[AuditRecord, ...], int]:
    records: list[AuditRecord] = []
    unreadable = 0
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
            records.append(AuditRecord.from_json_row(row))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            unreadable += 1
    return tuple(records), unreadable
