"""The client-facing HTTP/1.1 connection: aiohttp's ``RequestHandler`` plus what an edge needs
and aiohttp does not do (issue 9, CONTRACT §8).

Why a protocol subclass, and why hooked in this way:

- **Parser errors as the contract's JSON.** A request that aiohttp's parser rejects (llhttp's
  ``BadHttpMessage``, ``LineTooLong``, too many headers...) never becomes an application
  request: ``RequestHandler.data_received`` queues the error and ``start()`` answers it through
  ``RequestHandler.handle_error``, outside the application, so no middleware can see it. That
  answer is ``text/plain`` "400 Bad Request", and the exception is logged with a traceback and
  the offending bytes (a broken ``Authorization`` line would put an API key in the log).
  ``handle_error`` is therefore overridden: CONTRACT §8 JSON with a fresh request id, 431
  ``request_header_fields_too_large`` for an oversized request line or field and for too many
  fields, 400 ``bad_request`` otherwise, the connection closed, and one log line without bytes.
- **A deadline for the request head** (``server.header_timeout_s``). aiohttp has none: its
  ``keepalive_timeout`` only closes connections that sit idle *between* requests, so a client
  dripping a head one byte at a time holds a connection (and its memory) forever (slowloris).
  nginx's ``client_header_timeout`` is the model: the clock starts at the accept for a new
  connection and at the first byte of each later request on a kept-alive one, stops when the
  head is complete, and on expiry the connection is closed (after a 408 JSON when part of a head
  had arrived; a connection that never sent a byte is just closed). The clock is a deadline
  on the connection, checked by one sweep per listener every quarter of the timeout (at most
  1 s), not a timer per request: a deadline is enforced at most that much late.
- **A cap on open connections per process** (``server.max_connections``). Past it a new
  connection is closed as soon as it is accepted, so excess load is refused at once instead of
  queueing in the backlog or eating file descriptors until the process falls over (Envoy's
  listener connection limit behaves the same way).

aiohttp has no parameter for the protocol class (``web.Server.__call__`` constructs
``RequestHandler`` itself), so the listener is created here with ``loop.create_server`` and a
factory that builds ``EdgeRequestHandler`` around the runner's ``web.Server``
(``AppRunner.server``, public). Everything else stays aiohttp's: the ``AppRunner`` still runs the
application's startup and cleanup, and ``Server.shutdown`` still drains every connection on
SIGTERM. "The head is complete" is learnt from a wrapper around ``web.Server.request_handler``
(a public attribute): it runs when aiohttp starts handling a parsed request.

A client that leaves must not keep work going on its behalf (CONTRACT §7). aiohttp notices the
lost connection in ``connection_lost`` but, without ``handler_cancellation`` (off: it would
cancel every stage, store calls included), lets the handler run on. The forwarder registers its
task with ``cancel_on_departure`` while it waits on the upstream, and ``connection_lost`` cancels
it, so a request queued for a full pool is never sent and one in progress is aborted. While it
waits for a full pool nothing reads the connection, so ``watch_hangup`` polls it for a hang-up.

One more gap is closed here: llhttp can fail *after* a request was handed to the application
(a bad chunk size arriving after the head). aiohttp then queues the error behind that request
and never finishes its body, so the request would wait forever with an upstream connection
open. ``data_received`` notices it and answers 400 and closes (see ``_refuse_body``).

What this relies on in aiohttp (3.14; pinned by ``tests/e2e/test_smuggling.py`` and
``tests/unit/test_http_hardening.py``): the ``RequestHandler(manager, loop=..., **kwargs)``
constructor, ``handle_error``'s signature and that parse errors reach it with the parser's
exception, ``finish_response``'s signature (overridden to close after our 408 and after a final
answer to a client still waiting for 100 Continue, instead of aiohttp's lingering read),
``StreamReader.total_bytes``, ``force_close()``, ``request.writer.output_size``,
``web.Server.request_factory``
(wrapped by ``_tolerant``, pinned by ``tests/fuzz/corpus/line-absolute-form-bad-idna-host.txt``)
and its message's ``_replace`` (a NamedTuple), and one private attribute, read
only: ``RequestHandler._request_count`` (messages parsed on the connection, kept since aiohttp
3.0), the only sign that the parser failed while a body was streaming.
"""

from __future__ import annotations

import asyncio
import logging
import re
import select
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import StreamReader

from proxy.context import CLIENT_SCHEME, CTX, UNSERVED_VERSION
from proxy.core.forwarding import IPNetwork, trusted_peer
from proxy.core.proxy_header import BadProxyHeader, parse_proxy_header, starts_with_proxy_header
from proxy.errors import (
    BadRequest,
    HeadersTooLarge,
    InternalError,
    ProxyError,
    RequestBodyTimeout,
    error_body,
)
from proxy.pipeline.entry import awaits_continue, error_response

log = logging.getLogger("proxy.connection")

RequestHandlerFn = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
AppHandlerFn = Callable[[web.Request], Awaitable[web.StreamResponse]]

# llhttp's (and the Python parser's) message when a head has more than ``max_headers`` fields.
TOO_MANY_HEADERS = "Too many headers received"


# How often a request waiting for a full upstream pool looks for its client hanging up.
HANGUP_POLL_S = 0.1
_HANGUP_EVENTS = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR


class RequestHeadTimeout(ProxyError):
    status, code, message = 408, "request_timeout", "the request head was not received in time"


class ConnectionGate:
    """The settings every connection of one listener shares, and its count of open ones."""

    __slots__ = (
        "_last_report",
        "_sweep",
        "connections",
        "header_timeout_s",
        "max_connections",
        "max_field_size",
        "max_headers",
        "max_line_size",
        "open",
        "proxy_protocol",
        "refusals",
        "trusted_proxies",
    )

    def __init__(
        self,
        *,
        header_timeout_s: float,
        max_connections: int,
        max_headers: int,
        max_line_size: int,
        max_field_size: int,
        proxy_protocol: bool = False,
        trusted_proxies: Sequence[IPNetwork] = (),
    ) -> None:
        # server.proxy_protocol: connections from trusted_proxies may begin with a PROXY
        # header; from anyone else, one that does is closed without an answer.
        self.proxy_protocol = proxy_protocol
        self.trusted_proxies = tuple(trusted_proxies)
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.max_headers = max_headers
        self.max_line_size = max_line_size
        self.max_field_size = max_field_size
        self.open = 0
        # What was refused here, before the application saw a request, since start (for
        # /metrics: an attack made only of malformed heads is otherwise invisible there). The
        # reason is the contract code answered, or "no_request" (a connection closed at the
        # head deadline without a byte) or "connection_limit" (closed at max_connections), or
        # "proxy_header_untrusted" / "proxy_header_malformed" (closed at its first bytes).
        self.refusals: dict[str, int] = {}
        self._last_report = -1e9
        self.connections: set[EdgeRequestHandler] = set()  # admitted and open
        self._sweep: asyncio.TimerHandle | None = None

    def refuse(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def admit(self, now: float) -> bool:
        if self.open < self.max_connections:
            self.open += 1
            return True
        self.refuse("connection_limit")
        if now - self._last_report >= 10.0:  # one line per 10 s, not one per refusal
            self._last_report = now
            log.warning(
                "connection limit reached (%d open): refusing new connections (%d so far)",
                self.open,
                self.refusals["connection_limit"],
            )
        return False

    def release(self) -> None:
        self.open -= 1

    def watch(self, connection: EdgeRequestHandler) -> None:
        """Include ``connection`` in the head-deadline sweep while it is open."""
        self.connections.add(connection)
        if self._sweep is None:
            self._schedule()

    def forget(self, connection: EdgeRequestHandler) -> None:
        self.connections.discard(connection)

    def _schedule(self) -> None:
        interval = min(1.0, self.header_timeout_s / 4)
        self._sweep = asyncio.get_running_loop().call_later(interval, self._expire)

    def _expire(self) -> None:
        """Close the connections whose head deadline has passed; runs while any is open."""
        self._sweep = None
        try:
            now = asyncio.get_running_loop().time()
            for connection in [c for c in self.connections if c.head_deadline <= now]:
                # One connection's failure must not spare the others their deadline.
                try:
                    connection.head_expired()
                except Exception:
                    log.exception("closing a connection at its head deadline failed")
                    connection.head_deadline = _NONE  # not retried at every sweep
        finally:
            # Without a next sweep no connection on this listener has a head deadline any
            # more (slowloris protection gone), whatever happened above.
            if self.connections:
                self._schedule()


_QUOTED_TAIL = re.compile(r""":\s*(?:b?['"]|bytearray\().*$""")


def _describe(exc: BaseException | None) -> str:
    """The parser's own description, without the bytes it quotes (they may hold a key)."""
    text = exc.message if isinstance(exc, HttpProcessingError) else ""
    first = str(text).split("\n", 1)[0]
    first = _QUOTED_TAIL.sub("", first).strip().rstrip(":").strip()
    return first[:160] or "malformed request"


def parser_error(status: int, exc: BaseException | None, gate: ConnectionGate) -> ProxyError:
    """The contract error for what aiohttp's protocol would have answered with ``status``."""
    if isinstance(exc, LineTooLong):
        return HeadersTooLarge(
            f"the request line is over {gate.max_line_size} bytes or a header field is "
            f"over {gate.max_field_size} bytes"
        )
    if isinstance(exc, HttpProcessingError) and exc.message == TOO_MANY_HEADERS:
        return HeadersTooLarge(f"more than {gate.max_headers} header fields")
    if 400 <= status < 500:
        return BadRequest(_describe(exc))
    return InternalError()


def raw_error(error: ProxyError, rid: str | None = None) -> bytes:
    """A complete ``Connection: close`` response, written straight to the transport where
    aiohttp's response machinery cannot be used (no request yet, or one being handled)."""
    rid = rid or str(uuid.uuid4())
    body = error_body(error, rid)
    head = (
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Request-Id: {rid}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class EdgeRequestHandler(web.RequestHandler):
    """One client connection. See the module docstring for what it adds and why."""

    __slots__ = (
        "_admitted",
        "_current",
        "_departure",
        "_gate",
        "_hangup_watch",
        "_head_bytes",
        "_last_body",
        "_preamble",
        "_source",
        "client_tls",
        "departed",
        "head_deadline",
    )

    def __init__(self, manager: web.Server, gate: ConnectionGate, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gate = gate
        self._admitted = False
        self.departed = False  # the connection is lost (the client left, or it was closed)
        self._departure: asyncio.Task[Any] | None = None  # cancelled when it is lost
        self._hangup_watch: asyncio.TimerHandle | None = None
        self._current: web.BaseRequest | None = None  # the request being handled
        self._head_bytes = False  # bytes of the next head have arrived
        self.head_deadline = _NONE  # loop time by which the awaited head must be complete
        self._last_body: StreamReader | None = None  # the body of the last request handled
        # PROXY protocol: the first bytes while it is not yet known whether they are a header
        # (None: not expected, or done), and the client's address and TLS it named.
        self._preamble: bytearray | None = None
        self._source: tuple[str, int] | None = None
        self.client_tls = False

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        if not self._gate.admit(loop.time()):
            transport.close()  # refused at once: no task, no parser work, no timer
            return
        self._admitted = True
        super().connection_made(transport)
        self._gate.watch(self)
        self._arm()  # a new connection must send its first head in time (nginx does too)
        if self._gate.proxy_protocol:
            self._preamble = bytearray()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self.departed = True
        self._gate.release()
        self._gate.forget(self)
        self._disarm()
        super().connection_lost(exc)
        self.stop_watching_hangup()
        task, self._departure = self._departure, None
        if task is not None:
            task.cancel()

    def cancel_on_departure(self, task: asyncio.Task[Any] | None) -> None:
        """While set, losing the connection cancels ``task``: the forwarding of the request
        being handled, so that work for a client that has left stops (CONTRACT §7). aiohttp's
        ``handler_cancellation`` would cancel every stage, store calls included."""
        self._departure = task

    def watch_hangup(self) -> None:
        """Until ``stop_watching_hangup``, look for the client hanging up every
        ``HANGUP_POLL_S`` even though nothing reads the connection: aiohttp stops reading it
        once a body waiting to be forwarded fills its buffer, and a hang-up is then noticed
        only when the body is read, after the request went upstream. ``poll(2)``'s
        ``POLLRDHUP`` (Linux) reports a FIN behind unread data, ``POLLHUP``/``POLLERR`` a
        reset; either closes the connection, which ends the work (``cancel_on_departure``)."""
        transport = self.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or self._hangup_watch is not None:
            return
        poller = select.poll()
        poller.register(sock.fileno(), _HANGUP_EVENTS)
        loop = asyncio.get_running_loop()

        def check() -> None:
            if poller.poll(0):
                self._hangup_watch = None
                if self.transport is not None:
                    self.transport.abort()  # connection_lost follows: the client left
            else:
                self._hangup_watch = loop.call_later(HANGUP_POLL_S, check)

        self._hangup_watch = loop.call_later(HANGUP_POLL_S, check)

    def stop_watching_hangup(self) -> None:
        if self._hangup_watch is not None:
            self._hangup_watch.cancel()
            self._hangup_watch = None

    @property
    def peername(self) -> Any:
        """The client's address from a believed PROXY header, else the socket's peer. aiohttp
        reads it into ``request.remote``, which every stage takes the client address from."""
        if self._source is not None:
            return self._source
        return super().peername

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if self._preamble is not None:
            rest = self._proxy_preamble(data)
            if not rest:
                return
            data = rest
        # Bytes that arrive while no request is being handled and the last one's body is
        # complete belong to the next head: its clock starts with the first of them. Body
        # bytes (an upload in progress, or aiohttp's lingering read) never start it.
        request = self._current
        if request is None:
            if data and (self._last_body is None or self._last_body.is_eof()):
                self._head_bytes = True
                self._arm()
            super().data_received(data)
            return
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed and not request.content.is_eof():
            # The parser produced a message while the body being handled is unfinished: that
            # can only be an error (a bad chunk size arriving after the head). aiohttp queues
            # it behind the request and leaves the request's body waiting forever.
            self._refuse_body(request)

    def _proxy_preamble(self, data: bytes) -> bytes | None:
        """Take a PROXY header off the connection's first bytes (``server.proxy_protocol``);
        returns the bytes that follow it (the client's own), or None while undecided or once
        the connection is closed. From a peer outside ``trusted_proxies`` a header is refused:
        believing it would let anyone choose the address that allowed_ips, per-IP limits and
        audit rows see. Refused either way without an answer: whoever sent it is not speaking
        HTTP yet, and haproxy and nginx close silently too."""
        assert self._preamble is not None
        buffered = self._preamble
        buffered += data
        start = starts_with_proxy_header(buffered)
        if start is None:
            return None
        if not start:
            self._preamble = None
            return bytes(buffered)
        peer = super().peername
        address = peer[0] if isinstance(peer, tuple | list) else str(peer or "")
        if not trusted_peer(address, self._gate.trusted_proxies):
            self._refuse_preamble("proxy_header_untrusted", address)
            return None
        try:
            header = parse_proxy_header(buffered)
        except BadProxyHeader:
            self._refuse_preamble("proxy_header_malformed", address)
            return None
        if header is None:
            return None
        self._preamble = None
        self._source, self.client_tls = header.source, header.tls
        return bytes(buffered[header.length :])

    def _refuse_preamble(self, reason: str, peer: str) -> None:
        self._preamble = None
        self._gate.refuse(reason)
        log.info("closed a connection from %s without an answer: %s", peer, reason)
        transport = self.transport
        if transport is not None:
            transport.abort()

    # ------------------------------------------------------------------ aiohttp hooks

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        ctx = request.get(CTX)
        if ctx is None:
            return result
        stalled = ctx.error_code == RequestBodyTimeout.code
        waiting = (
            awaits_continue(request)
            and not ctx.continue_sent
            and request.content.total_bytes == 0  # it has not started sending regardless
        )
        if stalled or waiting:
            # Our 408 closes the connection (RFC 9110 §15.5.9), and so does a final answer to a
            # client still waiting for 100 Continue (§10.1.1). In both cases no body is on its
            # way, so aiohttp's lingering read (up to 10 s; it keeps a client that is uploading
            # from losing the answer to a reset) would only hold the connection. The answer is
            # written by now, and close() sends what is buffered first.
            self.force_close()
        return result

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's error answer (parser errors, and anything that escaped the app) as the
        contract's JSON; the connection is closed after it, as aiohttp does."""
        self._disarm()
        if request.writer.output_size > 0:
            # Part of a response is out: nothing valid can follow; aiohttp drops the connection.
            raise ConnectionError("response already started; cannot send an error")
        error = parser_error(status, exc, self._gate)
        if error.status < 500:  # a 500 is an error of the application, not a refusal
            self._gate.refuse(error.code)
        if error.status >= 500:
            log.error("unhandled error answering %s", request.remote, exc_info=exc)
        else:
            log.info(
                "refused a malformed request from %s: %d %s (%s)",
                request.remote,
                error.status,
                type(exc).__name__,
                _describe(exc),
            )
        rid = str(uuid.uuid4())
        response = error_response(error, rid)
        response.headers["X-Request-Id"] = rid
        # aiohttp answers a request it could not parse as HTTP/1.0 (it never learnt the
        # version), where closing is the default; say it anyway, for HTTP/1.1 clients.
        response.headers["Connection"] = "close"
        response.force_close()
        return response

    def head_received(self, request: web.BaseRequest) -> None:
        """Called as aiohttp starts handling a parsed request: its head is complete."""
        self._disarm()
        self._current = request
        self._head_bytes = False
        self._last_body = request.content

    def request_done(self) -> None:
        self._current = None

    def _refuse_body(self, request: web.BaseRequest) -> None:
        """The body of the request in progress broke its framing: answer 400 if no response
        has started, and close. Closing fails the body for the handler (aiohttp sets
        ``ConnectionResetError`` on it), so the upstream sees a truncated body, never a
        complete request, and its connection is not reused."""
        log.info("refused a malformed request body from %s", request.remote)
        self._gate.refuse(BadRequest.code)
        ctx = request.get(CTX)
        if ctx is not None:
            ctx.body_refused = True  # closing fails the body like a hang-up would
        transport = self.transport
        if transport is not None and request.writer.output_size == 0:
            rid = ctx.request_id if ctx is not None else None
            transport.write(raw_error(BadRequest("malformed chunked body"), rid))
        self.force_close()

    # ------------------------------------------------------------------ the head deadline

    def _arm(self) -> None:
        if self.head_deadline == _NONE:
            loop = asyncio.get_running_loop()
            self.head_deadline = loop.time() + self._gate.header_timeout_s

    def _disarm(self) -> None:
        self.head_deadline = _NONE

    def head_expired(self) -> None:
        """The gate's sweep found the head deadline passed."""
        self.head_deadline = _NONE
        transport = self.transport
        if self._current is not None or transport is None:
            return
        if self._head_bytes:
            # RFC 9110 §15.5.9: 408 tells the client why, before the server closes.
            transport.write(raw_error(RequestHeadTimeout()))
            self._gate.refuse(RequestHeadTimeout.code)
        else:
            self._gate.refuse("no_request")
        log.info(
            "closed a connection: no complete request head in %ss", self._gate.header_timeout_s
        )
        self.force_close()


_NONE = float("inf")  # no head awaited: never expires


def _guard(handler: AppHandlerFn) -> RequestHandlerFn:
    """``web.Server.request_handler``: tells the connection when a head is complete and when
    the request is done (the header deadline must not run during a request). The server's
    request factory is the application's, so its requests are ``web.Request``."""

    async def guarded(request: web.BaseRequest) -> web.StreamResponse:
        protocol = request.protocol
        edge = protocol if isinstance(protocol, EdgeRequestHandler) else None
        if edge is not None:
            edge.head_received(request)
        try:
            return await handler(cast(web.Request, request))
        finally:
            if edge is not None:
                edge.request_done()

    return guarded


RequestFactory = Callable[
    [
        RawRequestMessage,
        StreamReader,
        web.RequestHandler,
        AbstractStreamWriter,
        "asyncio.Task[None]",
    ],
    web.BaseRequest,
]


def _tolerant(factory: RequestFactory) -> RequestFactory:
    """Wrap ``web.Server.request_factory`` (a public attribute, like ``request_handler``).

    For an absolute-form target aiohttp resolves the URL's host through IDNA while it builds
    the request (``BaseRequest.__init__`` reads ``url.host``). A host such as ``xn--`` raises
    there, outside every handler: the connection's task dies ("Task exception was never
    retrieved", with a traceback in the log) and the client hears nothing until the head
    deadline answers 408. On that failure the request is built from the target's origin-form
    part instead; ``raw_path`` keeps the raw target, so the target stage refuses it with 400
    as it refuses any absolute-form target whose authority is not the ``Host``."""

    def make(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: web.RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        # Any HTTP/1.x is served as the highest 1.x this server speaks (RFC 9110 §2.5).
        unserved = message.version.major != 1
        if unserved:
            # llhttp accepts HTTP/0.9 and 2.0 request lines, and aiohttp would answer them in
            # kind ("HTTP/2.0 200 OK"). Rebuilt as HTTP/1.1 with the connection to close, the
            # entry stage refuses it with a 505 the client can read.
            requested = message.version
            message = message._replace(version=HttpVersion11, should_close=True)
        try:
            request = factory(message, payload, protocol, writer, task)
        except ValueError:
            if not message.url.absolute:
                raise
            relative = message._replace(url=message.url.relative())
            request = factory(relative, payload, protocol, writer, task)
        if unserved:
            request[UNSERVED_VERSION] = f"HTTP/{requested.major}.{requested.minor}"
        if isinstance(protocol, EdgeRequestHandler) and protocol.client_tls:
            request[CLIENT_SCHEME] = "https"  # a trusted front's PROXY header said so
        return request

    return make


async def listen(
    runner: web.AppRunner,
    handler: AppHandlerFn,
    host: str,
    port: int,
    gate: ConnectionGate,
    handler_kwargs: Mapping[str, Any],
    *,
    backlog: int = 1024,
) -> asyncio.AbstractServer:
    """Bind ``host:port`` (SO_REUSEPORT, for --workers) with ``EdgeRequestHandler`` connections
    whose every request goes to ``handler``, the application's one handler (``pipeline.plan``),
    without the application's router in between: no URL is matched, so a request whose target
    is not a path (``OPTIONS *``, ``CONNECT host:443``) gets the pipeline's own answer too. The
    runner still runs the application's start-up and cleanup. Close the returned server before
    ``runner.cleanup()``."""
    server = runner.server
    if server is None:
        raise RuntimeError("runner.setup() must run before listen()")
    server.request_handler = _guard(handler)
    server.request_factory = _tolerant(server.request_factory)
    loop = asyncio.get_running_loop()
    kwargs = dict(handler_kwargs)

    def connection() -> EdgeRequestHandler:
        return EdgeRequestHandler(server, gate, loop=loop, **kwargs)

    return await loop.create_server(connection, host, port, reuse_port=True, backlog=backlog)
