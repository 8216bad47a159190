"""The two checks of CONTRACT §12, each answering "verified, or why not".

- HTTP_FILE: ``GET http://D:<domains.http_port>/.well-known/flatrender-challenge/<token>``,
  connecting to the address the resolver gave for D (the Host header names D), 5 s for
  everything. Redirects are not followed (ACME's http-01 follows them, RFC 8555 §8.3; here the
  answer must come from the host D points at, not from wherever it sends us); passes on a 200
  whose body, stripped of blanks, is the token.
- HTTP_FILE connects only where ``domains.allow_networks`` or the webhooks' address policy
  (``webhooks.destinations``: public unicast) allows: a reseller's DNS could otherwise point D
  at the metadata service or a database on the edge's own network and make the verifier
  probe it.
- DNS_TXT: passes when one of the TXT strings at ``_flatrender-challenge.D`` is the token.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

import aiohttp
from yarl import URL

from proxy.domains.challenge import challenge_path, txt_name
from proxy.domains.resolver import LookupFailed, Resolver
from proxy.read_capped import read_capped
from proxy.webhooks.destinations import Policy

TIMEOUT_S = 5.0
# The token is 43 characters; an answer much longer than that is not a challenge answer.
MAX_BODY_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Outcome:
    verified: bool
    error: str | None = None  # None when verified


PASSED = Outcome(True)
# Public unicast addresses only; http is the method's own scheme, so the scheme rule is moot.
PUBLIC_ONLY = Policy(allow_http=True, allow_networks=())


class Checker:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        resolver: Resolver,
        http_port: int,
        timeout_s: float = TIMEOUT_S,
        *,
        policy: Policy = PUBLIC_ONLY,
    ) -> None:
        self._session = session
        self._policy = policy
        self._resolver = resolver
        self._port = http_port
        self._timeout = timeout_s

    async def check(self, method: str, domain: str, token: str) -> Outcome:
        try:
            async with asyncio.timeout(self._timeout):
                if method == "HTTP_FILE":
                    return await self._http_file(domain, token)
                if method == "DNS_TXT":
                    return await self._dns_txt(domain, token)
        except LookupFailed as e:
            return Outcome(False, e.code)
        except TimeoutError:
            return Outcome(False, "timeout")
        return Outcome(False, "unknown_method")

    async def _http_file(self, domain: str, token: str) -> Outcome:
        address = (await self._resolver.addresses(domain))[0]
        # The address checked is the one connected to: a literal, with no second lookup.
        if not self._policy.address_allowed(ipaddress.ip_address(address)):
            return Outcome(False, "address_not_allowed")
        url = URL.build(scheme="http", host=address, port=self._port, path=challenge_path(token))
        try:
            async with self._session.get(
                url, headers={"Host": domain}, allow_redirects=False
            ) as response:
                body = await read_capped(response.content, MAX_BODY_BYTES)
                status = response.status
        except (aiohttp.ClientError, OSError):
            return Outcome(False, "connection_failed")
        if status != 200:
            return Outcome(False, f"http_{status}")
        if body.decode("utf-8", "replace").strip() != token:
            return Outcome(False, "token_mismatch")
        return PASSED

    async def _dns_txt(self, domain: str, token: str) -> Outcome:
        records = await self._resolver.txt(txt_name(domain))
        # A long value may be split into several strings of one record (RFC 7208 §3.3 joins
        # them); the token fits one string, but either spelling is accepted.
        if any(token in strings or "".join(strings) == token for strings in records):
            return PASSED
        return Outcome(False, "token_mismatch")
