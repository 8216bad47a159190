"""Event types and the webhook patterns that subscribe to them (CONTRACT §11).

The same rules run in Postgres (``identity.edge_event_type_valid`` and
``identity.edge_event_type_matches`` in sql/005_edge_outbox.sql), because the fan-out happens in
the publisher's transaction; tests check both against one table of cases.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Two or more dotted lower-case words: "render.completed", "render.job.done".
EVENT_TYPE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")


def valid_type(event_type: str) -> bool:
    return EVENT_TYPE.fullmatch(event_type) is not None


def covers(pattern: str, event_type: str) -> bool:
    """``pattern`` is the type itself, ``*``, or ``prefix.*`` with the type under ``prefix.``
    (``render.*`` covers ``render.completed`` and ``render.job.done``, not ``render``)."""
    if pattern in ("*", event_type):
        return True
    return len(pattern) > 2 and pattern.endswith(".*") and event_type.startswith(pattern[:-1])


def matches(patterns: Iterable[str], event_type: str) -> bool:
    """Whether a webhook whose ``events`` are ``patterns`` receives ``event_type``."""
    return any(covers(p, event_type) for p in patterns)
