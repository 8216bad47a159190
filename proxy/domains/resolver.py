"""Name resolution for the checks, through dnspython's asyncio resolver (CONTRACT §12).

``domains.nameservers`` set: only those servers are asked (the tests' loopback DNS server, or a
deployment's own resolvers); unset: the system's (``/etc/resolv.conf``). Names are asked as
absolute names, never through a search list, and nothing is cached here: a reseller who has
just fixed a record must be seen by the next check.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from proxy.settings import HostPort

log = logging.getLogger("proxy.domains")


class LookupFailed(Exception):
    """A name could not be resolved; ``code`` is the check's error (``dns_nxdomain``, ...)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class Resolver(Protocol):
    async def addresses(self, name: str) -> list[str]:
        """The IPv4 addresses of ``name``, else its IPv6 ones; ``LookupFailed`` when none."""

    async def txt(self, name: str) -> list[list[str]]:
        """The TXT records at ``name``, each as its list of strings; ``LookupFailed`` when none."""


class DnsResolver:
    def __init__(self, nameservers: Sequence[HostPort], timeout_s: float) -> None:
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in nameservers
            ]
        else:
            try:
                self._resolver = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration as e:
                # No usable /etc/resolv.conf: the proxy still serves; every check fails with
                # dns_servfail (no server to ask) until domains.nameservers is set.
                log.error("domain checks: no system resolver (%s); set domains.nameservers", e)
                self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.lifetime = timeout_s

    async def _ask(self, name: str, rdtype: str) -> dns.resolver.Answer:
        try:
            return await self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise LookupFailed("dns_nxdomain") from None
        except dns.resolver.NoAnswer:
            raise LookupFailed("dns_no_record") from None
        except dns.exception.Timeout:
            raise LookupFailed("dns_timeout") from None
        except dns.resolver.NoNameservers:
            raise LookupFailed("dns_servfail") from None
        except dns.exception.DNSException:
            raise LookupFailed("dns_error") from None

    async def addresses(self, name: str) -> list[str]:
        try:
            answer = await self._ask(name, "A")
        except LookupFailed as e:
            if e.code != "dns_no_record":
                raise
            answer = await self._ask(name, "AAAA")
        return [rdata.to_text() for rdata in answer]

    async def txt(self, name: str) -> list[list[str]]:
        answer = await self._ask(name, "TXT")
        return [[s.decode("utf-8", "replace") for s in rdata.strings] for rdata in answer]
