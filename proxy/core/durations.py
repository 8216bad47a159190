"""Durations written by operators on the command line: ``90s``, ``15m``, ``24h``, ``7d``, ``0``.

One number and one unit, as the examples of CONTRACT §5 (and Go's time.ParseDuration for the
unit letters); no fractions, no combinations, so "1.5h" or "1h30m" is refused rather than
guessed at.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"(?P<n>[0-9]{1,9})(?P<unit>[smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Whole seconds; ``ValueError`` for anything that is not ``<digits><s|m|h|d>`` or ``0``."""
    if text == "0":
        return 0
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"expected a duration like 90s, 15m, 24h or 7d, got {text!r}")
    return int(match["n"]) * _UNIT_S[match["unit"]]
