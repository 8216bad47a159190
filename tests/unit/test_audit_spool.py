"""proxy.audit.spool: one fsync'd file per batch, atomic claims, orphans taken back (issue 6)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from proxy.audit.record import AuditRecord
from proxy.audit.spool import Spool, spool_dir_problem

TENANT = "00000000-0000-0000-0000-000000000001"


def record(i: int = 0, **fields: object) -> AuditRecord:
    values: dict[str, object] = {
        "created_at": datetime(2026, 11, 25, 12, 0, tzinfo=UTC) + timedelta(microseconds=i),
        "tenant_id": TENANT,
        "api_key_id": None,
        "method": "GET",
        "path": f"/v1/renders/{i}",
        "status_code": 200,
        "duration_ms": 3,
        "request_id": str(uuid.uuid4()),
        "ip_address": "203.0.113.7",
        "user_agent": "ua/1.0",
        "error_message": None,
    }
    values.update(fields)
    return AuditRecord(**values)  # type: ignore[arg-type]


def dead_pid() -> int:
    """A pid that certainly is not running any more: a child we started and reaped."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(child.stdout)


def spool(tmp_path: Path, max_bytes: int = 1 << 20, **kw: object) -> Spool:
    s = Spool(tmp_path / "spool", max_bytes, **kw)  # type: ignore[arg-type]
    s.prepare()
    return s


def test_round_trip_is_exact_and_oldest_first(tmp_path: Path) -> None:
    s = spool(tmp_path)
    first = [record(i, user_agent=None, api_key_id=str(uuid.uuid4())) for i in range(3)]
    second = [record(10 + i, error_message="missing_api_key", status_code=401) for i in range(2)]
    assert s.write(first) and s.write(second)
    assert len(s.pending()) == 2 and not list(s.directory.glob("*.tmp"))
    a = s.claim_next()
    b = s.claim_next()
    assert a is not None and b is not None and s.claim_next() is None
    assert a.records == tuple(first) and b.records == tuple(second)  # microseconds and all
    assert a.unreadable_lines == 0
    s.delete(a)
    s.release(b)
    assert [p.name for p in s.pending()] == [b.ready.name]


def test_two_processes_never_claim_the_same_file(tmp_path: Path) -> None:
    one = spool(tmp_path, host="h", pid=os.getpid())
    other = Spool(one.directory, 1 << 20, host="h", pid=os.getppid())
    for i in range(10):
        assert one.write([record(i)])
    claimed = []
    while True:
        got = [c for c in (one.claim_next(), other.claim_next()) if c is not None]
        if not got:
            break
        claimed += got
    names = [c.ready.name for c in claimed]
    assert len(names) == 10 and len(set(names)) == 10
    assert {c.path.name.rpartition("_")[2] for c in claimed} == {
        str(os.getpid()),
        str(os.getppid()),
    }


def test_cap_refuses_a_batch_that_would_pass_it(tmp_path: Path) -> None:
    s = spool(tmp_path, max_bytes=1500)
    assert s.write([record(i) for i in range(3)])  # ~300 bytes a row
    assert not s.write([record(i) for i in range(3)])
    assert len(s.pending()) == 1
    assert s.size() <= 1500


def test_files_of_dead_owners_are_taken_back(tmp_path: Path) -> None:
    s = spool(tmp_path, host="here")
    assert s.write([record(1)]) and s.write([record(2)])
    gone = dead_pid()
    first, second = s.pending()
    # A replayer on this host that died mid-replay, and a writer killed before its rename.
    first.rename(first.with_name(f"{first.name}.claimed_here_{gone}"))
    second.rename(
        second.with_name(f"{second.name[: -len('.jsonl')].rsplit('_', 1)[0]}_{gone}.jsonl.tmp")
    )
    # A claim by a live process on this host, and one on another host: left alone.
    assert s.write([record(3)]) and s.write([record(4)])
    live, remote = s.pending()[-2:]
    live.rename(live.with_name(f"{live.name}.claimed_here_{os.getppid()}"))
    remote.rename(remote.with_name(f"{remote.name}.claimed_elsewhere_{gone}"))
    assert s.prepare() == 2
    assert len(s.pending()) == 2
    # Untouched past stale_after_s, a claim is taken back whoever holds it.
    aged = Spool(s.directory, 1 << 20, host="here", stale_after_s=0.0)
    assert aged.prepare() == 2 and len(aged.pending()) == 4


def test_our_own_pid_at_start_is_an_earlier_process(tmp_path: Path) -> None:
    s = spool(tmp_path, host="here", pid=4242)
    assert s.write([record(1)])
    ready = s.pending()[0]
    ready.rename(ready.with_name(f"{ready.name}.claimed_here_4242"))
    assert Spool(s.directory, 1 << 20, host="here", pid=4242).prepare() == 1


def test_torn_and_foreign_lines_are_counted_not_fatal(tmp_path: Path) -> None:
    s = spool(tmp_path)
    assert s.write([record(1), record(2)])
    path = s.pending()[0]
    with path.open("ab") as f:
        f.write(b'{"not": "a row"}\n[1, 2]\n{"created_at": "2026-11-25T12:00:00+00:00", "tena')
    claimed = s.claim_next()
    assert claimed is not None
    assert len(claimed.records) == 2 and claimed.unreadable_lines == 3


def test_naive_timestamps_are_refused(tmp_path: Path) -> None:
    row = record(1).as_json_row()
    row["created_at"] = "2026-11-25T12:00:00"
    with pytest.raises(ValueError):
        AuditRecord.from_json_row(row)


def test_unwritable_directory_raises_oserror(tmp_path: Path) -> None:
    s = spool(tmp_path)
    s.directory.rmdir()
    s.directory.write_text("a file where the directory was")
    with pytest.raises(OSError):
        s.write([record(1)])


def test_spool_dir_problem_creates_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert spool_dir_problem(tmp_path) is None
    assert spool_dir_problem(tmp_path / "new" / "spool") is None  # prepare() would create it
    assert not (tmp_path / "new").exists()
    assert spool_dir_problem(blocker) == (
        f"audit.spool_dir: cannot use {blocker}: {blocker} is not a directory"
    )
    assert spool_dir_problem(blocker / "spool") == (
        f"audit.spool_dir: cannot use {blocker / 'spool'}: {blocker} is not a directory"
    )
    with pytest.raises(OSError):  # what serve would otherwise meet at start
        Spool(blocker / "spool", 1024).prepare()
