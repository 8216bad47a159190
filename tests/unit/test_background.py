"""The one shape of background jobs (proxy.background) and the key-usage recorder built on it:
a job survives an unexpected exception (logged, counted, restarted), stop() ends a round rather
than cutting it, and the recorder's close() never drops the batch a flush took."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import pytest

from proxy.background import Job, Periodic, RecoveryProbe, job_failures
from proxy.core.backoff import backoff_s
from proxy.errors import TenantStoreUnavailable
from proxy.stores.usage import KeyUsage, UsageRecorder

AT = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
WAIT = 5.0  # a bound on the test, never a synchronisation


@pytest.mark.parametrize(
    ("failures", "jitter", "expected"),
    [
        (0, 0.5, 0.0),  # no failure, no wait
        (1, 0.0, 0.05),  # the shortest wait is half the ceiling...
        (1, 1.0, 0.1),  # ...the longest the ceiling itself
        (2, 0.0, 0.1),
        (4, 0.0, 0.4),
        (7, 0.0, 2.5),  # capped: 0.1 * 2**6 = 6.4 > 5
        (1000, 1.0, 5.0),  # no overflow however long the outage
    ],
)
def test_backoff_grows_exponentially_capped_with_equal_jitter(
    failures: int, jitter: float, expected: float
) -> None:
    assert backoff_s(failures, base_s=0.1, cap_s=5.0, jitter=jitter) == pytest.approx(expected)


async def test_periodic_job_survives_an_exception_and_counts_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0
    second = asyncio.Event()

    def tick() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in a tick")
        second.set()

    job = Periodic("ticker", 0, tick, restart_base_s=0.001, restart_cap_s=0.001)
    with caplog.at_level(logging.ERROR, logger="proxy.background"):
        job.start()
        await asyncio.wait_for(second.wait(), WAIT)
        await job.stop()
    assert job.failures == 1
    assert "background job ticker failed" in caplog.text
    assert "a bug in a tick" in caplog.text  # the traceback is logged
    metric = job_failures([job])
    assert [(s.labels, s.value) for s in metric.samples] == [({"background_job": "ticker"}, 1)]


async def test_a_job_is_restarted_after_run_raises_and_backs_off_between_restarts() -> None:
    waits: list[float] = []
    healthy = asyncio.Event()

    class Flaky(Job):
        runs = 0

        async def run(self) -> None:
            self.runs += 1
            if self.runs <= 3:
                raise ValueError(f"failure {self.runs}")
            healthy.set()
            await self.sleep(3600)  # healthy now: waits for stop

        async def sleep(self, seconds: float) -> bool:
            if self.runs <= 3:
                waits.append(seconds)
            return await super().sleep(seconds if self.runs > 3 else 0)

    job = Flaky("flaky", restart_base_s=1.0, restart_cap_s=3.0, jitter=lambda: 0.0)
    job.start()
    await asyncio.wait_for(healthy.wait(), WAIT)
    assert job.running
    await job.stop()
    assert not job.running
    assert job.failures == 3
    assert waits == [0.5, 1.0, 1.5]  # 1, 2, then capped at 3 (equal jitter at 0: half of each)


async def test_stop_lets_the_round_in_progress_finish_then_calls_finish() -> None:
    order: list[str] = []
    in_round, release = asyncio.Event(), asyncio.Event()

    class OneRound(Job):
        async def run(self) -> None:
            order.append("round started")
            in_round.set()
            await release.wait()
            order.append("round ended")

        async def finish(self) -> None:
            order.append("finish")

    job = OneRound("one-round")
    job.start()
    await asyncio.wait_for(in_round.wait(), WAIT)
    stopping = asyncio.create_task(job.stop())
    await asyncio.sleep(0)
    assert not stopping.done()  # waits for the round instead of cancelling it
    release.set()
    await asyncio.wait_for(stopping, WAIT)
    assert order == ["round started", "round ended", "finish"]


class BlockingWrite:
    """A usage write that takes as long as the test says, recording what it was given."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.written: list[dict[str, KeyUsage]] = []
        self.block = True

    async def __call__(self, batch: dict[str, KeyUsage]) -> None:
        self.started.set()
        if self.block:
            await self.release.wait()
        self.written.append(batch)


def total(written: list[dict[str, KeyUsage]], key_id: str) -> int:
    return sum(batch[key_id].count for batch in written if key_id in batch)


async def test_close_during_a_flush_does_not_drop_the_batch() -> None:
    write = BlockingWrite()
    recorder = UsageRecorder(write, interval_s=0)
    await recorder.start()
    recorder.record("k1", AT, "192.0.2.1")
    recorder.record("k1", AT, "192.0.2.1")
    await asyncio.wait_for(write.started.wait(), WAIT)  # the job took the batch, mid-write
    recorder.record("k1", AT, "192.0.2.2")  # arrives while it is being written
    closing = asyncio.create_task(recorder.close())
    await asyncio.sleep(0)
    write.release.set()
    await asyncio.wait_for(closing, WAIT)
    assert total(write.written, "k1") == 3
    assert recorder.pending_keys == 0


async def test_a_write_cancelled_mid_flight_keeps_its_batch_for_the_next_flush() -> None:
    write = BlockingWrite()
    recorder = UsageRecorder(write, interval_s=3600)
    recorder.record("k1", AT, "192.0.2.1")
    flushing = asyncio.create_task(recorder.flush())
    await asyncio.wait_for(write.started.wait(), WAIT)
    recorder.record("k1", datetime(2026, 12, 7, 12, 1, tzinfo=UTC), "192.0.2.9")
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    write.block = False
    await recorder.flush()
    assert total(write.written, "k1") == 2
    kept = write.written[-1]["k1"]
    assert kept.last_used_ip == "192.0.2.9"  # the newest use wins


async def test_a_write_that_hangs_past_the_stop_timeout_is_cancelled_and_rewritten() -> None:
    write = BlockingWrite()
    recorder = UsageRecorder(write, interval_s=0)
    recorder.job = Periodic("key-usage", 0, recorder.flush, stop_timeout_s=0.01)
    await recorder.start()
    recorder.record("k1", AT, None)
    await asyncio.wait_for(write.started.wait(), WAIT)
    write.block = False  # the hung call stays hung; the final flush's call returns
    await asyncio.wait_for(recorder.close(), WAIT)
    assert total(write.written, "k1") == 1


async def test_an_unavailable_store_keeps_usage_pending_until_it_returns() -> None:
    calls = 0
    written: list[dict[str, KeyUsage]] = []

    async def write(batch: dict[str, KeyUsage]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TenantStoreUnavailable()
        written.append(batch)

    recorder = UsageRecorder(write, interval_s=3600)
    recorder.record("k1", AT, None)
    await recorder.flush()
    assert recorder.pending_keys == 1
    recorder.record("k1", AT, None)
    await recorder.flush()
    assert total(written, "k1") == 2


async def test_periodic_at_start_ticks_at_once_and_without_a_tick_on_stop() -> None:
    ticks = 0
    first = asyncio.Event()

    def tick() -> None:
        nonlocal ticks
        ticks += 1
        first.set()

    # An hour between ticks: only at_start can make the first one now.
    job = Periodic("sweep", 3600, tick, at_start=True, on_stop=False)
    job.start()
    await asyncio.wait_for(first.wait(), WAIT)
    await job.stop()
    assert ticks == 1  # no final tick on stop

    flush = Periodic("flush", 3600, tick)
    flush.start()
    await flush.stop()
    assert ticks == 2  # the default: no tick at start, one on stop


async def test_a_recovery_probe_checks_until_it_passes_then_ends() -> None:
    outcomes = [ConnectionError("down"), TimeoutError(), None]
    failed, recovered = [], asyncio.Event()

    async def check() -> None:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    probe = RecoveryProbe(
        "probe", 0, check, recovered=recovered.set, failed=lambda: failed.append(1)
    )
    probe.start()
    await asyncio.wait_for(recovered.wait(), WAIT)
    await probe.stop()
    assert (len(failed), outcomes, probe.failures) == (2, [], 0)  # expected failures, no bugs


async def test_stopping_a_probe_that_is_waiting_ends_it_without_a_check() -> None:
    checks = 0

    async def check() -> None:
        nonlocal checks
        checks += 1

    probe = RecoveryProbe("probe", 3600, check, recovered=lambda: None)
    probe.start()
    await asyncio.sleep(0)  # the probe is waiting for its first interval
    await asyncio.wait_for(probe.stop(), WAIT)
    assert not probe.running and checks == 0


async def test_a_key_used_many_times_between_flushes_is_one_row_of_one_write() -> None:
    written: list[dict[str, KeyUsage]] = []

    async def write(batch: dict[str, KeyUsage]) -> None:
        written.append(batch)

    recorder = UsageRecorder(write, interval_s=3600)
    for i in range(1000):
        recorder.record(
            "k1", datetime(2026, 12, 7, 12, 0, i % 60, tzinfo=UTC), f"192.0.2.{i % 250}"
        )
    recorder.record("k2", AT, None)
    await recorder.flush()
    await recorder.flush()  # nothing new: no write at all
    assert len(written) == 1
    assert {k: u.count for k, u in written[0].items()} == {"k1": 1000, "k2": 1}
    assert written[0]["k1"].last_used_at == datetime(2026, 12, 7, 12, 0, 59, tzinfo=UTC)


async def test_a_large_backlog_is_written_in_chunks_and_only_the_unwritten_part_is_kept() -> None:
    written: list[dict[str, KeyUsage]] = []
    fail_from = 2  # the third write fails: an outage in the middle of a backlog

    async def write(batch: dict[str, KeyUsage]) -> None:
        if len(written) == fail_from:
            raise TenantStoreUnavailable()
        written.append(batch)

    recorder = UsageRecorder(write, interval_s=3600, max_keys_per_write=10)
    for i in range(45):
        recorder.record(f"k{i}", AT, None)
    await recorder.flush()
    assert [len(b) for b in written] == [10, 10]
    assert recorder.pending_keys == 25  # the 20 written are not kept: never counted twice
    fail_from = -1
    await recorder.flush()
    assert [len(b) for b in written] == [10, 10, 10, 10, 5]
    assert sorted(k for b in written for k in b) == sorted(f"k{i}" for i in range(45))
    assert all(u.count == 1 for b in written for u in b.values())
