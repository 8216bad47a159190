"""The [audit] keys of database mode (issue 6): safe defaults, and a ConfigError naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.app import build_stores
from proxy.settings import ConfigError, load_settings, parse_settings
from proxy.stores.usage import UsageRecorder

ROOT = Path(__file__).resolve().parents[2]
MINIMAL: dict[str, Any] = {
    "upstreams": {"render-api": {"urls": ["http://127.0.0.1:9001"]}},
    "routes": [{"prefix": "/v1/renders", "upstream": "render-api", "audit": True}],
}


def parse(**audit: object) -> Any:
    return parse_settings({**MINIMAL, "audit": audit}, {}, Path("edge.toml")).audit


def test_defaults_and_the_shipped_file_agree() -> None:
    a = parse()
    assert (a.batch_max_rows, a.buffer_max_rows, a.spool_max_bytes) == (1000, 10_000, 1 << 30)
    assert (a.write_timeout_s, a.drain_timeout_s) == (5.0, 5.0)
    assert a.usage_flush_interval_s == 10.0
    shipped = load_settings({}, str(ROOT / "config" / "edge.toml")).audit
    assert shipped == a  # the file documents the defaults, it does not change them


def test_values_are_read() -> None:
    a = parse(
        batch_max_rows=50,
        buffer_max_rows=50,
        spool_max_bytes=4096,
        write_timeout_s=0.5,
        drain_timeout_s=2,
        usage_flush_interval_s=2.5,
    )
    assert (a.batch_max_rows, a.buffer_max_rows, a.spool_max_bytes) == (50, 50, 4096)
    assert (a.write_timeout_s, a.drain_timeout_s) == (0.5, 2.0)
    assert a.usage_flush_interval_s == 2.5


@pytest.mark.parametrize(
    ("audit", "key"),
    [
        ({"batch_max_rows": 0}, "audit.batch_max_rows"),
        ({"batch_max_rows": 10.5}, "audit.batch_max_rows"),
        ({"buffer_max_rows": -1}, "audit.buffer_max_rows"),
        ({"buffer_max_rows": "many"}, "audit.buffer_max_rows"),
        ({"batch_max_rows": 500, "buffer_max_rows": 100}, "audit.buffer_max_rows"),
        ({"spool_max_bytes": 0}, "audit.spool_max_bytes"),
        ({"spool_max_bytes": "1GB"}, "audit.spool_max_bytes"),
        ({"write_timeout_s": 0}, "audit.write_timeout_s"),
        ({"drain_timeout_s": -5}, "audit.drain_timeout_s"),
        ({"usage_flush_interval_s": 0}, "audit.usage_flush_interval_s"),
        ({"usage_flush_interval_s": "10s"}, "audit.usage_flush_interval_s"),
        ({"spool_max_byte": 1}, "audit.spool_max_byte"),
    ],
)
def test_bad_values_name_the_key(audit: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(**audit)
    assert str(caught.value).startswith(f"{key}:") and "\n" not in str(caught.value)


def test_key_usage_is_flushed_at_its_own_interval_not_the_audit_batches() -> None:
    """Key usage is one row update per active key per flush: at the audit batches' 500 ms
    that was two updates per key per second under steady traffic."""
    settings = parse_settings(
        {**MINIMAL, "audit": {"flush_interval_ms": 500, "usage_flush_interval_s": 7}},
        {"DATABASE_URL": "postgresql://edge@127.0.0.1:1/edge"},
        Path("edge.toml"),
    )
    usage = build_stores(settings).usage
    assert isinstance(usage, UsageRecorder)
    assert usage.job.interval_s == 7.0
