"""proxy.domains.rules and proxy.domains.challenge: what `domains add` refuses and prints."""

from __future__ import annotations

import re

import pytest

from proxy.domains.challenge import instructions, new_token
from proxy.domains.rules import add_refusal, domain_refusal

PLATFORM = ("flatrender.test", "eu.flatrender.test")


@pytest.mark.parametrize(
    ("domain", "refused"),
    [
        ("videos.acme.com", None),
        ("acme.com", None),  # a reseller's own apex is fine
        ("xn--bcher-kva.example", None),
        ("notflatrender.test", None),
        ("192.0.2.7", "IP address"),
        ("[2001:db8::1]", "IP address"),
        ("flatrender.test", "platform name"),  # the platform apex
        ("acme.flatrender.test", "platform name"),  # another tenant's slug host
        ("a.b.flatrender.test", "platform name"),
        ("eu.flatrender.test", "platform name"),
    ],
)
def test_domain_refusal(domain: str, refused: str | None) -> None:
    reason = domain_refusal(domain, PLATFORM)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason and "\n" not in reason


@pytest.mark.parametrize(
    ("current", "verified", "other", "replace", "refused"),
    [
        (None, False, None, False, None),  # first domain
        ("old.acme.com", False, None, False, None),  # an unverified one is simply replaced
        ("shop.acme.com", False, None, False, None),  # again, same unverified domain: new row
        ("old.acme.com", True, None, True, None),  # --replace a verified one
        (None, False, "globex", False, "another tenant"),
        (None, False, "globex", True, "another tenant"),  # --replace never takes another's
        ("old.acme.com", True, None, False, "--replace"),
        ("shop.acme.com", True, None, False, "already"),  # own verified domain again
        ("shop.acme.com", True, None, True, "already"),
    ],
)
def test_add_refusal(
    current: str | None, verified: bool, other: str | None, replace: bool, refused: str | None
) -> None:
    reason = add_refusal(
        "shop.acme.com",
        current_domain=current,
        current_verified=verified,
        other_tenant=other,
        replace=replace,
    )
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


def test_tokens_are_long_url_safe_and_fresh() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{32,}", t) for t in tokens)


def test_instructions_for_each_method() -> None:
    http = instructions("shop.acme.com", "HTTP_FILE", "tok")
    assert http["url"] == "http://shop.acme.com/.well-known/flatrender-challenge/tok"
    assert http["expected_body"] == "tok"
    dns = instructions("shop.acme.com", "DNS_TXT", "tok")
    assert (dns["record_name"], dns["record_type"], dns["record_value"]) == (
        "_flatrender-challenge.shop.acme.com",
        "TXT",
        "tok",
    )
