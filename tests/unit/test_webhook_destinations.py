"""The destination policy of webhooks (CONTRACT §11): schemes, address ranges, and a resolver
whose answer is both the one checked and the one connected to."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from proxy.webhooks.destinations import (
    DestinationNotAllowed,
    GuardedResolver,
    Policy,
    public_unicast,
)

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # shared address space (RFC 6598)
        ("169.254.169.254", False),  # link-local, the cloud metadata service
        ("fe80::1", False),
        ("fc00::1", False),  # unique local (RFC 4193)
        ("224.0.0.1", False),  # multicast: is_global alone would let it through
        ("ff02::1", False),
        ("240.0.0.1", False),  # reserved
        ("0.0.0.0", False),
        ("::", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:93.184.216.34", True),
        ("fec0::1", False),  # site-local: is_global alone would allow it
        ("2002:a00:1::1", False),  # 6to4 carrying 10.0.0.1
        ("2002:5db8:d822::1", True),  # 6to4 carrying 93.184.216.34
        ("64:ff9b::a00:1", False),  # NAT64 (reserved ::/8 in Python's table): refused
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
    ],
)
def test_public_unicast(address: str, public: bool) -> None:
    assert public_unicast(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize(
    ("url", "allow_http", "networks", "allowed"),
    [
        ("https://hooks.example.com/x", False, (), True),  # a name: checked at resolution
        ("http://hooks.example.com/x", False, (), False),
        ("http://hooks.example.com/x", True, (), True),
        ("ftp://hooks.example.com/x", True, (), False),
        ("https://127.0.0.1:8443/x", False, (), False),
        ("https://127.0.0.1:8443/x", False, LOOPBACK, True),
        ("https://[::1]/x", False, LOOPBACK, False),  # an IPv6 address is not in 127/8
        ("https://169.254.169.254/latest", False, LOOPBACK, False),
        ("https://93.184.216.34/x", False, (), True),
        ("https://host:notaport/x", False, (), False),
        ("https:///nohost", False, (), False),
        # aiohttp connects to the host of its yarl.URL, which maps fullwidth (and other
        # compatibility) digits to ASCII (UTS 46): judged as that address.
        ("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11:8080/x", True, (), False),
        ("http://\u2460\u2461\u2466.0.0.1/x", True, (), False),  # circled digits
        ("https://\uff11\uff16\uff19.254.169.254/x", False, (), False),
        ("https://\uff19\uff13.184.216.34/x", False, (), True),
        ("https://\uff11\uff12\uff17.0.0.1/x", False, LOOPBACK, True),
        ("https://127.0.0.1./x", False, (), False),  # a trailing dot
        ("https://0177.0.0.1/x", False, (), False),  # octal: not a plain literal
        ("https://[fe80::1%25eth0]/x", False, (), False),  # a zone index
        ("https://[::ffff:127.0.0.1]/x", False, (), False),
    ],
)
def test_check_url(url: str, allow_http: bool, networks: tuple[object, ...], allowed: bool) -> None:
    policy = Policy(allow_http=allow_http, allow_networks=networks)  # type: ignore[arg-type]
    if allowed:
        policy.check_url(url)
    else:
        with pytest.raises(DestinationNotAllowed):
            policy.check_url(url)


class FakeResolver(AbstractResolver):
    """Answers from a table, like a DNS server the test controls."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        return [
            ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET, proto=0, flags=0)
            for a in self.answers.get(host, [])
        ]

    async def close(self) -> None:
        pass


async def test_every_answer_must_be_allowed() -> None:
    fake = FakeResolver({"mixed.test": ["127.0.0.1", "10.0.0.1"], "ok.test": ["127.0.0.2"]})
    guarded = GuardedResolver(fake, Policy(allow_http=True, allow_networks=LOOPBACK))
    assert [a["host"] for a in await guarded.resolve("ok.test", 80)] == ["127.0.0.2"]
    with pytest.raises(DestinationNotAllowed):
        await guarded.resolve("mixed.test", 80)  # one private answer refuses them all
    with pytest.raises(OSError):
        await guarded.resolve("nothing.test", 80)


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[tuple[int, list[str]]]:
    hosts: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        hosts.append(request.host)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield port, hosts
    await runner.cleanup()


async def test_the_connection_goes_to_the_checked_address(
    receiver: tuple[int, list[str]],
) -> None:
    port, hosts = receiver
    fake = FakeResolver({"hooks.reseller.test": ["127.0.0.1"], "evil.test": ["169.254.169.254"]})
    policy = Policy(allow_http=True, allow_networks=LOOPBACK)
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(fake, policy), use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(f"http://hooks.reseller.test:{port}/hook") as r:
            assert r.status == 200
        with pytest.raises(aiohttp.ClientConnectorError) as refused:
            await session.post("http://evil.test/hook")
    assert isinstance(refused.value.os_error, DestinationNotAllowed)
    # One lookup per connection, through the guard; the receiver saw the name, not a rewrite.
    assert fake.lookups == ["hooks.reseller.test", "evil.test"]
    assert hosts == [f"hooks.reseller.test:{port}"]
