"""Event types and webhook patterns (CONTRACT §11): one table, also run against the SQL
functions of sql/005_edge_outbox.sql by tests/e2e/test_outbox_postgres.py."""

from __future__ import annotations

import pytest

from proxy.core.events import covers, matches, valid_type

TYPES = [
    ("render.completed", True),
    ("render.job.done", True),
    ("render_v2.failed_1", True),
    ("a.b", True),
    ("render", False),  # one word
    ("Render.completed", False),
    ("render.", False),
    (".render", False),
    ("render..done", False),
    ("render.1done", False),
    ("1render.done", False),
    ("render.com-pleted", False),
    ("render.completed\n", False),
    ("", False),
    ("render.*", False),
]

# (pattern, type, covered)
PATTERNS = [
    ("render.completed", "render.completed", True),
    ("render.completed", "render.failed", False),
    ("*", "render.completed", True),
    ("*", "account.x", True),
    ("render.*", "render.completed", True),
    ("render.*", "render.job.done", True),
    ("render.job.*", "render.job.done", True),
    ("render.job.*", "render.completed", False),
    ("render.*", "renders.completed", False),
    ("render.*", "render", False),
    ("render", "render.completed", False),
    (".*", "render.completed", False),
    ("render*", "render.completed", False),
    ("render.completed.*", "render.completed", False),
    ("", "render.completed", False),
]


@pytest.mark.parametrize(("event_type", "valid"), TYPES)
def test_valid_type(event_type: str, valid: bool) -> None:
    assert valid_type(event_type) is valid


@pytest.mark.parametrize(("pattern", "event_type", "covered"), PATTERNS)
def test_covers(pattern: str, event_type: str, covered: bool) -> None:
    assert covers(pattern, event_type) is covered


def test_matches_any_pattern() -> None:
    assert matches(["render.failed", "render.*"], "render.completed")
    assert not matches(["render.failed", "account.*"], "render.completed")
    assert not matches([], "render.completed")
