"""[webhooks] settings (CONTRACT §11): defaults, and every bad value named by its key."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from proxy.settings import ConfigError
from tests.unit.test_settings import _parse, _with


def test_defaults_are_the_contracts() -> None:
    w = _parse().webhooks
    assert w.enabled is True
    assert w.timeout_s == 15
    assert w.lease_s == 20  # timeout_s + 5 s
    assert w.retry_schedule_s == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert w.disable_after_failures == 20
    assert (w.max_in_flight_per_webhook, w.max_in_flight) == (4, 256)
    assert w.allow_http is False  # https only
    assert w.allow_networks == ()  # no private destination
    assert w.retention_days == 30


def test_values() -> None:
    w = _parse(
        _with(
            "webhooks",
            {
                "timeout_s": 2,
                "retry_schedule_s": [0.2, 1],
                "allow_http": True,
                "allow_networks": ["127.0.0.0/8", "::1/128"],
            },
        )
    ).webhooks
    assert w.lease_s == 7  # follows timeout_s
    assert w.retry_schedule_s == (0.2, 1.0)
    assert w.allow_networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"timeout_s": 0}, "webhooks.timeout_s"),
        ({"retry_schedule_s": [5, -1]}, "webhooks.retry_schedule_s"),
        ({"retry_schedule_s": "5,10"}, "webhooks.retry_schedule_s"),
        ({"retry_schedule_s": [True]}, "webhooks.retry_schedule_s"),
        ({"disable_after_failures": 0}, "webhooks.disable_after_failures"),
        ({"max_in_flight": 1.5}, "webhooks.max_in_flight"),
        ({"allow_networks": ["10.0.0.0/33"]}, "webhooks.allow_networks"),
        ({"allow_http": "yes"}, "webhooks.allow_http"),
        ({"retention_days": 0}, "webhooks.retention_days"),
        ({"timeout_s": 10, "lease_s": 10}, "webhooks.lease_s"),  # must exceed the timeout
        ({"timeout_s": 10, "lease_s": 14.9}, "webhooks.lease_s"),  # ...by 5 s at least
        ({"retry_schdule_s": [1]}, "webhooks.retry_schdule_s"),  # unknown key
    ],
)
def test_bad_values_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _parse(_with("webhooks", table))
