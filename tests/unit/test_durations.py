"""proxy.core.durations: the DURATION of ``keys rotate --grace`` (CONTRACT §5)."""

from __future__ import annotations

import pytest

from proxy.core.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0),
        ("0s", 0),
        ("90s", 90),
        ("15m", 900),
        ("24h", 86_400),
        ("7d", 604_800),
        ("30d", 2_592_000),
        ("1s", 1),
    ],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        "90",
        "-5m",
        "1.5h",
        "1h30m",
        "24H",
        " 24h",
        "24h ",
        "h",
        "3w",
        "1e3s",
        "٩s",
        "9999999999s",
    ],
)
def test_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
