"""A loopback authoritative DNS server for the tests (UDP, RFC 1035 §4.2.1), on its own thread.

It answers A, AAAA and TXT questions from ``records``, which the test changes at will, and counts
every question it receives by (name, type), so a test can tell how often a name was looked up.
A name with no record of any type is NXDOMAIN; a name with records of other types only is an
empty NOERROR answer (RFC 2308 §2.2, NODATA). dnspython builds and parses the messages.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Self, cast

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

TTL = 0  # nothing may be cached between two checks of a test


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: LoopbackDns) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return  # not a DNS message: a real server drops it too
        assert self._transport is not None
        self._transport.sendto(self._server.answer(query).to_wire(), addr)


class LoopbackDns:
    def __init__(self) -> None:
        # (name without trailing dot, lower-case; "A" | "AAAA" | "TXT") -> values
        self.records: dict[tuple[str, str], list[str]] = {}
        self.queries: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    # -- what the test controls

    def set(self, name: str, rdtype: str, *values: str) -> None:
        with self._lock:
            if values:
                self.records[(name.lower(), rdtype)] = list(values)
            else:
                self.records.pop((name.lower(), rdtype), None)

    def count(self, name: str, rdtype: str) -> int:
        with self._lock:
            return self.queries[(name.lower(), rdtype)]

    @property
    def address(self) -> str:
        """As ``domains.nameservers`` takes it."""
        return f"127.0.0.1:{self.port}"

    # -- serving

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries[(name, rdtype)] += 1
            values = self.records.get((name, rdtype), [])
            exists = any(n == name for n, _ in self.records)
        if not exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif values:
            if rdtype == "TXT":
                values = ['"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values]
            response.answer.append(
                dns.rrset.from_text_list(question.name, TTL, "IN", rdtype, values)
            )
        return response

    def start(self) -> Self:
        self._thread.start()

        async def bind() -> int:
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda: _Protocol(self), local_addr=("127.0.0.1", 0)
            )
            port: int = transport.get_extra_info("sockname")[1]
            return port

        self.port = asyncio.run_coroutine_threadsafe(bind(), self._loop).result(5)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
