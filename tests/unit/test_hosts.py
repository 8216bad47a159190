"""proxy.core.hosts: Host normalisation and classification (CONTRACT §3)."""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.hosts import (
    BadHost,
    HostMatch,
    classify_host,
    is_platform_name,
    normalize_host,
    platform_domain_of,
)

PLATFORM = ("flatrender.test",)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("example.com", "example.com"),
        # port stripped
        ("example.com:8080", "example.com"),
        ("example.com:80", "example.com"),
        ("example.com:", "example.com"),  # RFC 3986 port = *DIGIT: an empty port is valid
        # lower-cased
        ("EXAMPLE.Com", "example.com"),
        ("Acme.FlatRender.TEST:443", "acme.flatrender.test"),
        # exactly one trailing dot removed (the root label of an FQDN)
        ("example.com.", "example.com"),
        ("Example.COM.:8443", "example.com"),
        # surrounding whitespace is the header parser's business, not part of the name
        ("  example.com  ", "example.com"),
        # IPv4 literals are valid hosts
        ("192.0.2.7", "192.0.2.7"),
        ("192.0.2.7:8080", "192.0.2.7"),
        # IPv6 literals keep their brackets, in compressed lower-case form
        ("[::1]", "[::1]"),
        ("[::1]:8080", "[::1]"),
        ("[::1]:", "[::1]"),
        ("[2001:DB8:0:0:0:0:0:1]", "[2001:db8::1]"),
        ("[2001:db8::1]:443", "[2001:db8::1]"),
        # single-label and digit-leading names are valid DNS names
        ("localhost", "localhost"),
        ("3com.example", "3com.example"),
        ("a-b.example", "a-b.example"),
        # RFC 3986 reg-name allows "_" (nginx and Envoy accept it too); no tenant uses one
        ("a_b.example", "a_b.example"),
        # a label of exactly 63 characters
        ("a" * 63 + ".example", "a" * 63 + ".example"),
    ],
)
def test_normalize_host_accepts(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(
    ("unicode_host", "ascii_host"),
    [
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("bücher.example:8080", "xn--bcher-kva.example"),
        ("bücher.example.", "xn--bcher-kva.example"),
        # RFC 3490 §3.1: U+3002 IDEOGRAPHIC FULL STOP is a dot, trailing one included
        ("bücher\u3002example", "xn--bcher-kva.example"),
        ("bücher.example\u3002", "xn--bcher-kva.example"),
        ("münchen.flatrender.test", "xn--mnchen-3ya.flatrender.test"),
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
    ],
)
def test_unicode_host_equals_its_idna_spelling(unicode_host: str, ascii_host: str) -> None:
    assert normalize_host(unicode_host) == ascii_host
    assert normalize_host(ascii_host) == ascii_host


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        ":8080",
        # two trailing dots: only one is removed, the empty label that remains is invalid
        "example.com..",
        "bücher.example..",
        # empty labels elsewhere
        ".example.com",
        "a..b",
        ".",
        # not a port
        "example.com:http",
        "example.com:80:80",
        "example.com:-1",
        "example.com: 80",
        "example.com:\u0668\u0660",  # Arabic-Indic "80": str.isdigit() says yes, RFC 3986 no
        "example.com:\u00b2",  # superscript two
        # bare IPv6 without brackets is ambiguous with host:port
        "::1",
        "2001:db8::1",
        "2001:db8::1:443",
        # malformed IPv6 literals
        "[::1",
        "[]",
        "[::1]x",
        "[::1]:x",
        "[::1]:80:80",
        "[not-an-ip]",
        "[192.0.2.7]",
        "[fe80::1%eth0]",  # a zone identifier is not part of RFC 3986's IPv6address
        "[fe80::1%25eth0]",
        # garbage and characters that are never part of a name
        "exa mple.com",
        "example.com/path",
        "user@example.com",
        "example.com?x",
        "exa\tmple.com",
        "*.example.com",
        "example!.com",
        # hyphens only inside a label
        "-example.com",
        "example-.com",
        "a.-b.com",
        # too long: a label over 63 characters, a name over 253
        "a" * 64 + ".example",
        ".".join(["a" * 63] * 4 + ["ab"]),  # 256 characters
        "bü" + "c" * 70 + ".example",  # overlong label after IDNA
    ],
)
def test_normalize_host_rejects(raw: str) -> None:
    with pytest.raises(BadHost):
        normalize_host(raw)


def test_ipv4_mapped_literal_is_one_spelling() -> None:
    # Python 3.13 changed how ipaddress prints these; whatever it prints, both spellings agree.
    expected = f"[{ipaddress.IPv6Address('::ffff:192.0.2.7').compressed}]"
    assert normalize_host("[::FFFF:192.0.2.7]") == expected
    assert normalize_host("[0:0:0:0:0:ffff:c000:0207]:80") == expected


def test_name_of_exactly_253_characters_is_accepted() -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(name) == 253
    assert normalize_host(name) == name
    with pytest.raises(BadHost):
        normalize_host(name + "b")


def test_bad_host_is_a_value_error() -> None:
    # Callers that only know ValueError still catch it.
    assert issubclass(BadHost, ValueError)


# --------------------------------------------------------------------------- classify_host


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("flatrender.test", HostMatch("platform")),
        ("acme.flatrender.test", HostMatch("slug", "acme")),
        ("xn--mnchen-3ya.flatrender.test", HostMatch("slug", "xn--mnchen-3ya")),
        # two labels under the apex: not a slug, and reserved (never a custom domain)
        ("a.acme.flatrender.test", HostMatch("reserved")),
        ("www.flatrender.test.flatrender.test", HostMatch("reserved")),
        # merely ends with the platform string
        ("evilflatrender.test", HostMatch("other")),
        ("acme.evilflatrender.test", HostMatch("other")),
        ("flatrender.test.evil.example", HostMatch("other")),
        ("flatrender.tester", HostMatch("other")),
        ("test", HostMatch("other")),
        ("videos.acme.test", HostMatch("other")),
        ("[::1]", HostMatch("other")),
        ("192.0.2.7", HostMatch("other")),
    ],
)
def test_classify_host(host: str, expected: HostMatch) -> None:
    assert classify_host(host, PLATFORM) == expected


def test_classify_host_with_several_platform_domains() -> None:
    domains = ("flatrender.test", "flatrender.example")
    assert classify_host("flatrender.example", domains) == HostMatch("platform")
    assert classify_host("acme.flatrender.example", domains) == HostMatch("slug", "acme")
    assert classify_host("acme.flatrender.test", domains) == HostMatch("slug", "acme")
    assert classify_host("acme.other.example", domains) == HostMatch("other")


def test_classify_host_finds_slug_under_a_nested_platform_domain() -> None:
    # "acme.eu.flatrender.test" is two labels under the first domain but one under the second.
    domains = ("flatrender.test", "eu.flatrender.test")
    assert classify_host("acme.eu.flatrender.test", domains) == HostMatch("slug", "acme")


def test_classify_host_without_platform_domains() -> None:
    assert classify_host("flatrender.test", ()) == HostMatch("other")


NESTED = ("flatrender.test", "eu.flatrender.test", "flatrender.example")


@pytest.mark.parametrize(
    ("host", "domain", "expected"),
    [
        # a listed nested domain is an apex of its own, not the slug "eu"
        ("eu.flatrender.test", "eu.flatrender.test", HostMatch("platform")),
        ("acme.eu.flatrender.test", "eu.flatrender.test", HostMatch("slug", "acme")),
        ("a.b.eu.flatrender.test", "eu.flatrender.test", HostMatch("reserved")),
        ("us.flatrender.test", "flatrender.test", HostMatch("slug", "us")),
        ("acme.us.flatrender.test", "flatrender.test", HostMatch("reserved")),
        ("flatrender.test", "flatrender.test", HostMatch("platform")),
        ("acme.flatrender.example", "flatrender.example", HostMatch("slug", "acme")),
        ("neu.flatrender.test", "flatrender.test", HostMatch("slug", "neu")),
        ("videos.acme.test", None, HostMatch("other")),
        ("eu.flatrender.tester", None, HostMatch("other")),
        ("xeu.flatrender.test", "flatrender.test", HostMatch("slug", "xeu")),
    ],
)
def test_longest_platform_domain_decides_whatever_the_order(
    host: str, domain: str | None, expected: HostMatch
) -> None:
    for order in itertools.permutations(NESTED):
        assert platform_domain_of(host, order) == domain, order
        assert classify_host(host, order) == expected, order
        assert is_platform_name(host, order) == (domain is not None), order


@pytest.mark.parametrize(
    ("host", "reserved"),
    [
        ("flatrender.test", True),  # the apex
        ("acme.flatrender.test", True),  # a slug host, existing or not
        ("www.acme.flatrender.test", True),  # deeper names under the apex too
        ("videos.acme.test", False),
        ("flatrender.test.evil.example", False),
        ("evilflatrender.test", False),
        ("test", False),
        ("192.0.2.7", False),
        ("[::1]", False),
    ],
)
def test_is_platform_name_one_domain(host: str, reserved: bool) -> None:
    assert is_platform_name(host, PLATFORM) is reserved
    assert is_platform_name(host, ()) is False


# --------------------------------------------------------------------------- properties

_label = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
_unicode_label = st.text(
    # Latin with diacritics, Cyrillic (written as escapes: ruff flags look-alikes), CJK
    alphabet=st.sampled_from("abcxyzäöüéñßøåç\u0410\u0411\u0412\u0430\u0431\u0432日本語"),
    min_size=1,
    max_size=12,
)
_name = st.lists(st.one_of(_label, _unicode_label), min_size=1, max_size=5).map(".".join)
_port = st.one_of(st.just(""), st.integers(0, 65535).map(lambda p: f":{p}"))
_ipv6 = st.ip_addresses(v=6).map(lambda ip: f"[{ip.exploded.upper()}]")
_hosts = st.one_of(
    st.builds(lambda n, dot, p: n + dot + p, _name, st.sampled_from(["", "."]), _port),
    st.builds(lambda ip, p: ip + p, _ipv6, _port),
    st.ip_addresses(v=4).map(str),
    st.text(max_size=30),  # arbitrary garbage: must either normalise or raise BadHost
)


def _normalized_or_none(raw: str) -> str | None:
    try:
        return normalize_host(raw)
    except BadHost:
        return None


@settings(max_examples=300, deadline=None)
@given(_hosts)
def test_normalize_host_properties(raw: str) -> None:
    host = _normalized_or_none(raw)
    if host is None:
        return
    # idempotent on its outputs
    assert normalize_host(host) == host
    # never upper-case, always ASCII (IDNA form)
    assert host == host.lower()
    assert host.isascii()
    # ':' only inside an IPv6 literal's brackets, i.e. the port is always gone
    if ":" in host:
        assert host.startswith("[") and host.endswith("]")
    assert not host.endswith(".")
    assert len(host) <= 253 or host.startswith("[")


@settings(max_examples=100, deadline=None)
@given(_label, _port)
def test_case_port_and_trailing_dot_do_not_change_the_tenant(label: str, port: str) -> None:
    base = normalize_host(f"{label}.flatrender.test")
    for variant in (label.upper(), label.lower(), label.swapcase()):
        assert normalize_host(f"{variant}.FlatRender.test.{port}") == base
    assert classify_host(base, PLATFORM) == HostMatch("slug", label.lower())


@pytest.mark.parametrize(
    ("host", "reserved"),
    [
        ("flatrender.test", True),  # the apex
        ("acme.flatrender.test", True),  # a slug host
        ("a.b.flatrender.test", True),  # deeper names too
        ("eu.other.test", True),
        ("notflatrender.test", False),  # a suffix that is not a label boundary
        ("flatrender.test.evil.com", False),
        ("videos.acme.com", False),
        ("test", False),
    ],
)
def test_is_platform_name(host: str, reserved: bool) -> None:
    assert is_platform_name(host, ("flatrender.test", "other.test")) is reserved


def test_normalisation_is_remembered_within_a_bound_and_refusals_never_are() -> None:
    for _ in range(2):  # a refusal raises every time: exceptions are never cached
        with pytest.raises(BadHost):
            normalize_host("bad host!")
    for i in range(5000):  # made-up names cannot grow the memo past its bound
        assert normalize_host(f"H{i}.Example.test.") == f"h{i}.example.test"
    assert normalize_host.cache_info().currsize <= 4096
