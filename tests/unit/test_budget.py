"""proxy.core.budget.MissBudget: tables over a fake clock."""

from __future__ import annotations

import pytest

from proxy.core.budget import MissBudget


def test_a_burst_then_the_rate() -> None:
    budget = MissBudget(rate=20, burst=20, now=0.0)
    assert [budget.try_take(0.0) for _ in range(21)] == [True] * 20 + [False]
    assert budget.wait_s(0.0) == pytest.approx(0.05)
    assert not budget.try_take(0.049)
    assert budget.try_take(0.05)
    assert not budget.try_take(0.05)
    # one second later: twenty more, never more than the burst
    assert sum(budget.try_take(1.05) for _ in range(40)) == 20
    assert sum(budget.try_take(100.0) for _ in range(40)) == 20


def test_tokens_given_back_are_taken_again_and_never_exceed_the_burst() -> None:
    budget = MissBudget(rate=1, burst=3, now=0.0)
    for _ in range(3):
        assert budget.try_take(0.0)
    assert not budget.try_take(0.0)
    budget.give_back(0.0)  # a lookup that found its name
    assert budget.wait_s(0.0) == 0.0
    assert budget.try_take(0.0)
    for _ in range(10):
        budget.give_back(0.0)
    assert sum(budget.try_take(0.0) for _ in range(10)) == 3


def test_hits_alone_never_run_it_dry() -> None:
    """Each lookup takes a token and, finding its name, gives it back: any number of them."""
    budget = MissBudget(rate=2, burst=2, now=0.0)
    for _ in range(10_000):
        assert budget.try_take(0.0)
        budget.give_back(0.0)


def test_a_clock_stepping_back_does_not_drain_it() -> None:
    budget = MissBudget(rate=10, burst=10, now=100.0)
    assert budget.try_take(50.0)
    assert sum(budget.try_take(50.0) for _ in range(20)) == 9
