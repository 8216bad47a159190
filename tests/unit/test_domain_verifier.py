"""proxy.domains.verifier.run_pass with a fake store and checker: what a pass checks, records
and counts (the real Postgres, DNS and HTTP are in tests/e2e/test_domains_postgres.py)."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from proxy.app import build_stores, store_metrics
from proxy.domains.checks import Checker, Outcome
from proxy.domains.service import start_verifier
from proxy.domains.store import DomainStore, DueCheck
from proxy.domains.verifier import LEASE, CheckCounters, CheckReport, DomainVerifier, run_pass
from proxy.settings import parse_settings
from proxy.telemetry import Telemetry
from tests.e2e.support import within

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
PLATFORM = ("flatrender.test",)


class FakeStore:
    def __init__(self, due: list[DueCheck]) -> None:
        self.due = due
        self.claims: list[tuple[datetime, datetime, str | None]] = []
        self.recorded: list[tuple[str, bool, datetime]] = []

    async def claim_due(
        self, now: datetime, lease_until: datetime, domain: str | None, limit: int
    ) -> list[DueCheck]:
        self.claims.append((now, lease_until, domain))
        return self.due

    async def record(self, check: DueCheck, verified: bool, at: datetime) -> None:
        self.recorded.append((check.id, verified, at))


class FakeChecker:
    def __init__(self, passing: set[str]) -> None:
        self.passing = passing
        self.asked: list[tuple[str, str, str]] = []

    async def check(self, method: str, domain: str, token: str) -> Outcome:
        self.asked.append((method, domain, token))
        if domain.startswith("poison"):
            raise ValueError("a bug in a check")
        return Outcome(True) if domain in self.passing else Outcome(False, "token_mismatch")


async def _pass(store: FakeStore, checker: FakeChecker, **kw: Any) -> list[CheckReport]:
    return await run_pass(
        cast(DomainStore, store),
        cast(Checker, checker),
        lambda: NOW,
        PLATFORM,
        kw.pop("counters", CheckCounters()),
        **kw,
    )


async def test_a_pass_checks_records_and_reports_every_due_row() -> None:
    store = FakeStore(
        [
            DueCheck("1", "t1", "shop.acme.test", "HTTP_FILE", "tok1"),
            DueCheck("2", "t2", "shop.globex.test", "DNS_TXT", "tok2"),
        ]
    )
    checker = FakeChecker({"shop.acme.test"})
    counters = CheckCounters()
    reports = await _pass(store, checker, counters=counters)
    assert store.claims == [(NOW, NOW + LEASE, None)]
    assert sorted(checker.asked) == [
        ("DNS_TXT", "shop.globex.test", "tok2"),
        ("HTTP_FILE", "shop.acme.test", "tok1"),
    ]
    assert store.recorded == [("1", True, NOW), ("2", False, NOW)]
    assert [r.as_json() for r in reports] == [
        {
            "id": "1",
            "domain": "shop.acme.test",
            "method": "HTTP_FILE",
            "verified": True,
            "error": None,
        },
        {
            "id": "2",
            "domain": "shop.globex.test",
            "method": "DNS_TXT",
            "verified": False,
            "error": "token_mismatch",
        },
    ]
    assert counters.by_method_outcome[("HTTP_FILE", "passed")] == 1
    assert counters.by_method_outcome[("DNS_TXT", "failed")] == 1
    assert counters.by_method_outcome[("HTTP_FILE", "failed")] == 0


async def test_reserved_names_and_ips_written_by_others_are_never_checked() -> None:
    store = FakeStore(
        [
            DueCheck("1", "t1", "acme.flatrender.test", "HTTP_FILE", "tok"),
            DueCheck("2", "t1", "192.0.2.7", "HTTP_FILE", "tok"),
        ]
    )
    checker = FakeChecker({"acme.flatrender.test", "192.0.2.7"})
    reports = await _pass(store, checker)
    assert checker.asked == []
    assert [(r.verified, r.error) for r in reports] == [(False, "domain_not_allowed")] * 2
    assert [verified for _, verified, _ in store.recorded] == [False, False]


async def test_one_domain_on_demand_and_nothing_due() -> None:
    store = FakeStore([])
    assert await _pass(store, FakeChecker(set()), domain="shop.acme.test") == []
    assert store.claims == [(NOW, NOW + timedelta(seconds=60), "shop.acme.test")]
    assert store.recorded == []


async def test_a_check_that_raises_fails_its_row_and_the_rest_are_recorded() -> None:
    store = FakeStore(
        [
            DueCheck("1", "t1", "poison.example", "HTTP_FILE", "tok"),
            DueCheck("2", "t2", "shop.acme.test", "HTTP_FILE", "tok"),
        ]
    )
    reports = await _pass(store, FakeChecker({"shop.acme.test"}))
    assert [(r.id, r.verified, r.error) for r in reports] == [
        ("1", False, "check_failed"),
        ("2", True, None),
    ]
    assert store.recorded == [("1", False, NOW), ("2", True, NOW)]


async def test_a_failing_verifier_is_counted_on_metrics(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``serve`` registers the verifier with the stores' jobs: its unexpected exceptions are
    on /metrics as edge_background_job_failures, like every other background job's."""

    async def broken(_self: DomainVerifier) -> None:
        raise RuntimeError("a bug in the verifier")

    monkeypatch.setattr(DomainVerifier, "run", broken)
    embedded = parse_settings({}, {}, tmp_path / "edge.toml")
    stores = build_stores(embedded)
    telemetry = Telemetry(embedded.telemetry)
    telemetry.collect_from(store_metrics(stores))
    # Nothing is ever connected to: run() raises first.
    database = replace(embedded, database_url="postgresql://127.0.0.1:1/none")
    running = await start_verifier(database, telemetry, lambda: NOW, stores.more_jobs)
    assert running is not None
    try:

        async def failed() -> bool:
            return running.verifier.failures >= 1

        await within(5.0, failed)
        text = telemetry.exposition().decode()
        counted = re.search(
            r'^edge_background_job_failures_total\{background_job="domain-verifier"\} (\S+)$',
            text,
            re.MULTILINE,
        )
        assert counted is not None and float(counted.group(1)) >= 1
    finally:
        await running.close()
