"""proxy.domains.verifier.run_pass with a fake store and checker: what a pass checks, records
and counts (the real Postgres, DNS and HTTP are in tests/e2e/test_domains_postgres.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from proxy.domains.checks import Checker, Outcome
from proxy.domains.store import DomainStore, DueCheck
from proxy.domains.verifier import LEASE, CheckCounters, CheckReport, run_pass

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
