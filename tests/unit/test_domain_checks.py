"""proxy.domains.checks and proxy.domains.resolver against a loopback DNS server
(tests/dnsserver.py) and a loopback HTTP server: HTTP_FILE and DNS_TXT of CONTRACT §12."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.domains.checks import Checker, Outcome
from proxy.domains.resolver import DnsResolver, LookupFailed
from proxy.settings import HostPort
from proxy.webhooks.destinations import Policy
from tests.dnsserver import LoopbackDns

TOKEN = "T0ken_With-Url-Safe-Chars_0123456789abcdefg"
# What the tests' domains.allow_networks says: the loopback servers here are not public.
LOOPBACK_ALLOWED = Policy(allow_http=True, allow_networks=[ipaddress.ip_network("127.0.0.0/8")])


def _name() -> str:
    return f"d{uuid.uuid4().hex[:10]}.reseller.example"


@pytest.fixture
def resolver(dns_server: LoopbackDns) -> DnsResolver:
    return DnsResolver([HostPort("127.0.0.1", dns_server.port)], timeout_s=2.0)


@pytest.fixture
def silent_udp_port() -> Iterator[int]:
    """A UDP port where nothing ever answers: a black-holed DNS server."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


# --------------------------------------------------------------------------- resolver


async def test_addresses_and_txt(dns_server: LoopbackDns, resolver: DnsResolver) -> None:
    name = _name()
    dns_server.set(name, "A", "127.0.0.1", "127.0.0.2")
    dns_server.set(f"_flatrender-challenge.{name}", "TXT", "one", "two")
    # An RRset is a set (RFC 2181 §5): no order to rely on.
    assert sorted(await resolver.addresses(name)) == ["127.0.0.1", "127.0.0.2"]
    assert sorted(await resolver.txt(f"_flatrender-challenge.{name}")) == [["one"], ["two"]]
    assert dns_server.count(name, "A") == 1  # asked once, as an absolute name (no search list)


async def test_ipv6_only_names_fall_back_to_aaaa(
    dns_server: LoopbackDns, resolver: DnsResolver
) -> None:
    name = _name()
    dns_server.set(name, "AAAA", "::1")
    assert await resolver.addresses(name) == ["::1"]


@pytest.mark.parametrize(
    ("records", "code"),
    [
        ({}, "dns_nxdomain"),
        ({"TXT": ["x"]}, "dns_no_record"),  # the name exists, without an address
    ],
)
async def test_lookup_failures_have_codes(
    dns_server: LoopbackDns, resolver: DnsResolver, records: dict[str, list[str]], code: str
) -> None:
    name = _name()
    for rdtype, values in records.items():
        dns_server.set(name, rdtype, *values)
    with pytest.raises(LookupFailed) as caught:
        await resolver.addresses(name)
    assert caught.value.code == code


async def test_a_server_that_never_answers_is_a_timeout(silent_udp_port: int) -> None:
    resolver = DnsResolver([HostPort("127.0.0.1", silent_udp_port)], timeout_s=0.3)
    with pytest.raises(LookupFailed) as caught:
        await resolver.txt("_flatrender-challenge.example.com")
    assert caught.value.code == "dns_timeout"


# --------------------------------------------------------------------------- HTTP_FILE


@pytest_asyncio.fixture
async def site() -> AsyncIterator[dict[str, Any]]:
    """A loopback HTTP server whose challenge answer the test sets; it records Host headers."""
    state: dict[str, Any] = {"status": 200, "body": TOKEN, "hosts": [], "delay": 0.0}

    async def challenge(request: web.Request) -> web.StreamResponse:
        state["hosts"].append(request.headers.get("Host"))
        await asyncio.sleep(state["delay"])
        if state["status"] == 302:
            raise web.HTTPFound("/elsewhere")
        return web.Response(status=state["status"], text=state["body"])

    async def elsewhere(_request: web.Request) -> web.Response:
        state["followed"] = True
        return web.Response(text=TOKEN)

    app = web.Application()
    app.router.add_get("/.well-known/flatrender-challenge/{token}", challenge)
    app.router.add_get("/elsewhere", elsewhere)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state["port"] = server.port
    yield state
    await server.close()


@pytest_asyncio.fixture
async def make_checker(
    resolver: DnsResolver,
) -> AsyncIterator[Callable[..., Checker]]:
    async with aiohttp.ClientSession() as session:

        def make(port: int, timeout_s: float = 5.0) -> Checker:
            return Checker(session, resolver, port, timeout_s, policy=LOOPBACK_ALLOWED)

        yield make


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, TOKEN, Outcome(True)),
        (200, f"  \n{TOKEN}\r\n ", Outcome(True)),  # stripped of blanks
        (200, TOKEN + "x", Outcome(False, "token_mismatch")),
        (200, "", Outcome(False, "token_mismatch")),
        (404, TOKEN, Outcome(False, "http_404")),
        (503, TOKEN, Outcome(False, "http_503")),
        (302, "", Outcome(False, "http_302")),  # redirects are not followed
    ],
)
async def test_http_file(
    dns_server: LoopbackDns,
    site: dict[str, Any],
    make_checker: Callable[..., Checker],
    status: int,
    body: str,
    expected: Outcome,
) -> None:
    domain = _name()
    dns_server.set(domain, "A", "127.0.0.1")
    site["status"], site["body"] = status, body
    assert await make_checker(site["port"]).check("HTTP_FILE", domain, TOKEN) == expected
    assert site["hosts"] == [domain]  # connected to the resolved address, asking for the domain
    assert "followed" not in site


async def test_http_file_connects_to_the_address_dns_gives(
    dns_server: LoopbackDns, site: dict[str, Any], make_checker: Callable[..., Checker]
) -> None:
    domain = _name()
    dns_server.set(domain, "A", "127.0.0.9")  # nothing listens on that loopback address
    outcome = await make_checker(site["port"]).check("HTTP_FILE", domain, TOKEN)
    assert outcome == Outcome(False, "connection_failed")
    assert site["hosts"] == []


async def test_http_file_failures(
    dns_server: LoopbackDns, site: dict[str, Any], make_checker: Callable[..., Checker]
) -> None:
    unknown = _name()
    assert await make_checker(site["port"]).check("HTTP_FILE", unknown, TOKEN) == Outcome(
        False, "dns_nxdomain"
    )
    slow = _name()
    dns_server.set(slow, "A", "127.0.0.1")
    site["delay"] = 2.0
    outcome = await make_checker(site["port"], timeout_s=0.3).check("HTTP_FILE", slow, TOKEN)
    assert outcome == Outcome(False, "timeout")


async def test_http_file_refuses_addresses_the_policy_does_not_allow(
    dns_server: LoopbackDns, resolver: DnsResolver, site: dict[str, Any]
) -> None:
    """By default only public unicast addresses are checked (webhooks.destinations' policy):
    a domain pointed at loopback, a private network or the metadata service is not probed."""
    async with aiohttp.ClientSession() as session:
        checker = Checker(session, resolver, site["port"])  # no allow_networks: the default
        for address in ("127.0.0.1", "10.0.0.1", "169.254.169.254"):
            domain = _name()
            dns_server.set(domain, "A", address)
            outcome = await checker.check("HTTP_FILE", domain, TOKEN)
            assert outcome == Outcome(False, "address_not_allowed"), address
    assert site["hosts"] == []  # nothing was sent


async def test_http_file_reads_a_body_sent_in_several_writes(
    dns_server: LoopbackDns, make_checker: Callable[..., Checker]
) -> None:
    """The token arrives in two TCP writes 100 ms apart (a raw server, so nothing coalesces
    them): the check reads to the end of the body, not only what the first read returned."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        half = len(TOKEN) // 2
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(TOKEN), TOKEN[:half].encode())
        )
        await writer.drain()
        await asyncio.sleep(0.1)  # a slow sender: the first half is read before the rest comes
        writer.write(TOKEN[half:].encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    domain = _name()
    dns_server.set(domain, "A", "127.0.0.1")
    try:
        assert await make_checker(port).check("HTTP_FILE", domain, TOKEN) == Outcome(True)
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------- DNS_TXT


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([TOKEN], Outcome(True)),
        (["v=spf1 -all", TOKEN], Outcome(True)),  # one of several records
        (["wrong-value"], Outcome(False, "token_mismatch")),
        ([], Outcome(False, "dns_nxdomain")),
    ],
)
async def test_dns_txt(
    dns_server: LoopbackDns,
    make_checker: Callable[..., Checker],
    values: list[str],
    expected: Outcome,
) -> None:
    domain = _name()
    dns_server.set(f"_flatrender-challenge.{domain}", "TXT", *values)
    assert await make_checker(1).check("DNS_TXT", domain, TOKEN) == expected
    assert dns_server.count(f"_flatrender-challenge.{domain}", "TXT") == 1


async def test_an_unknown_method_fails(make_checker: Callable[..., Checker]) -> None:
    assert await make_checker(1).check("EMAIL", "shop.example", TOKEN) == Outcome(
        False, "unknown_method"
    )


async def test_without_a_system_resolver_checks_fail_instead_of_the_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dns.resolver

    def missing(*_args: object, **_kw: object) -> None:
        raise dns.resolver.NoResolverConfiguration("cannot open /etc/resolv.conf")

    monkeypatch.setattr(dns.resolver.BaseResolver, "read_resolv_conf", missing)
    resolver = DnsResolver([], timeout_s=0.5)  # the system resolver: none configured
    with pytest.raises(LookupFailed) as caught:
        await resolver.txt("_flatrender-challenge.example.com")
    assert caught.value.code == "dns_servfail"
