"""The ``[domains]`` table of the configuration (CONTRACT §12), validated up front."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from proxy.settings import ConfigError, DomainsSettings, HostPort, parse_settings


def _parse(domains: dict[str, Any] | None) -> DomainsSettings:
    data = {} if domains is None else {"domains": domains}
    return parse_settings(data, {}, Path("edge.toml")).domains


def test_defaults_are_the_contract_s() -> None:
    d = _parse(None)
    assert d.verify is True
    assert d.http_port == 80
    assert d.nameservers == ()  # the system resolver
    assert d.challenge_ttl_s == 7 * 86400
    assert d.allow_networks == ()  # HTTP_FILE checks reach public unicast addresses only


def test_every_key() -> None:
    d = _parse(
        {
            "verify": False,
            "http_port": 8080,
            "nameservers": ["127.0.0.1:5353", "[::1]:53"],
            "challenge_ttl_s": 3600,
            "allow_networks": ["127.0.0.0/8", "fd00::/8"],
        }
    )
    assert d == DomainsSettings(
        verify=False,
        http_port=8080,
        nameservers=(HostPort("127.0.0.1", 5353), HostPort("::1", 53)),
        challenge_ttl_s=3600.0,
        allow_networks=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("fd00::/8")),
    )


@pytest.mark.parametrize(
    ("domains", "key"),
    [
        ({"verify": "no"}, "domains.verify"),
        ({"http_port": 0}, "domains.http_port"),
        ({"http_port": 65536}, "domains.http_port"),
        ({"http_port": "80"}, "domains.http_port"),
        ({"nameservers": "127.0.0.1:53"}, "domains.nameservers"),
        ({"nameservers": ["127.0.0.1"]}, "domains.nameservers"),
        ({"nameservers": ["ns1.example.com:53"]}, "domains.nameservers"),  # by address only
        ({"nameservers": ["127.0.0.1:0"]}, "domains.nameservers"),
        ({"challenge_ttl_s": 0}, "domains.challenge_ttl_s"),
        ({"challenge_ttl_s": -1}, "domains.challenge_ttl_s"),
        ({"allow_networks": "127.0.0.0/8"}, "domains.allow_networks"),
        ({"allow_networks": ["not-a-cidr"]}, "domains.allow_networks"),
        ({"verfy": True}, "domains.verfy"),  # a typo is an unknown key, not a default
    ],
)
def test_bad_values_name_the_key(domains: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _parse(domains)
    assert str(caught.value).startswith(f"{key}:")
    assert "\n" not in str(caught.value)
