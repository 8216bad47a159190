"""The last stage: send the request to its upstream and stream the answer back (CONTRACT §7).

Bodies stream both ways in the chunks they arrive in; nothing is buffered whole. Retries follow
RFC 9110 §9.2.2: a request that never reached an upstream (connection refused, connect timeout)
moves on to the next URL whatever its method. One that may have reached it is not failed over;
the only retry it gets is aiohttp's own, once, when a pooled keep-alive connection turns out to
have been closed by the upstream, and only for idempotent methods (``ClientSession`` limits it
to GET, HEAD, OPTIONS, TRACE, PUT and DELETE).

A client that leaves ends the work done for it (CONTRACT §7): the connection cancels this
stage's task when it is lost (``EdgeRequestHandler.cancel_on_departure``), wherever it is
waiting: for a pool slot (nothing was sent), for the upstream's answer or a chunk of the relay
(the upstream connection is closed, so the upstream sees the request aborted). The request is
then a 499 ``client_closed_request``. aiohttp's own ``handler_cancellation`` would do the same
for every stage, store calls included; only forwarding is cancelled here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.trace import Span, SpanKind
from yarl import URL

from proxy.connection import EdgeRequestHandler
from proxy.context import CLIENT_SCHEME, CTX, RequestContext
from proxy.core.apikeys import bearer_key
from proxy.core.forwarding import (
    IPNetwork,
    forwarded_origin,
    request_headers_to_forward,
    response_headers_to_return,
    trusted_peer,
)
from proxy.errors import (
    BadRequest,
    ClientClosedRequest,
    PayloadTooLarge,
    ProxyError,
    RequestBodyTimeout,
    UpstreamBusy,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.pipeline.entry import CountedStream, send_continue, stamp_response
from proxy.pipeline.websocket import is_websocket_upgrade, relay_websocket
from proxy.telemetry import Telemetry
from proxy.upstreams import UpstreamPool

log = logging.getLogger("proxy.forward")


class _BodyTooLarge(Exception):
    pass


class _BodyStalled(Exception):
    pass


class _RequestBody:
    """The client's body as an async iterable for aiohttp's client, counting what it passed on.

    ``max_body_bytes`` is checked against ``Content-Length`` before any upstream is contacted;
    a chunked body has no declared size, so it is counted here and the upload is aborted at the
    limit: the upstream then sees a truncated chunked body, never a complete request.
    """

    __slots__ = (
        "_content",
        "_limit",
        "_opening",
        "_timeout",
        "client_failed",
        "client_gone",
        "sent",
        "stalled",
        "too_large",
    )

    def __init__(
        self,
        content: aiohttp.StreamReader,
        limit: int,
        timeout_s: float,
        opening: Callable[[], Awaitable[None]],
    ) -> None:
        self._content = content
        self._limit = limit
        self._timeout = timeout_s
        self._opening = opening  # runs before the first read (sends 100 Continue if awaited)
        self.sent = 0
        self.too_large = False
        self.stalled = False  # no body bytes for timeout_s
        self.client_failed = False  # reading the client's body failed (bad framing, hang-up)
        self.client_gone = False  # ... because the client closed or reset its connection

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            await self._opening()
        except ConnectionError:
            self.client_failed = self.client_gone = True
            raise
        chunks = self._content.iter_any()
        while True:
            try:
                async with asyncio.timeout(self._timeout):
                    chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                self.stalled = True
                raise _BodyStalled from None
            except Exception as e:
                self.client_failed = True
                # aiohttp fails the body with ConnectionResetError when the connection is lost
                self.client_gone = isinstance(e, ConnectionError)
                raise
            self.sent += len(chunk)
            if self.sent > self._limit:
                self.too_large = True
                raise _BodyTooLarge
            yield chunk


def upstream_headers(
    request: web.Request, ctx: RequestContext, trusted: Sequence[IPNetwork]
) -> CIMultiDict[str]:
    received = request.headers
    headers = CIMultiDict(request_headers_to_forward(list(received.items())))
    if any(bearer_key(v) is not None for v in headers.getall("Authorization", ())):
        # A raw key never goes upstream; other tokens do. Every Authorization line counts:
        # the auth stage reads the first, a key hidden in a second one must not pass either.
        del headers["Authorization"]
    if request.content_length is not None:
        headers["Content-Length"] = str(request.content_length)
    headers["X-Forwarded-For"] = ctx.forwarded_for
    headers["X-Forwarded-Proto"], headers["X-Forwarded-Host"] = forwarded_origin(
        trusted_peer(request.remote or "", trusted),
        received.getall("X-Forwarded-Proto", ()),
        received.getall("X-Forwarded-Host", ()),
        request.get(CLIENT_SCHEME) or request.scheme,
        received.get("Host", ctx.host),  # as sent, port included (exactly one: target stage)
    )
    headers["X-Request-Id"] = ctx.request_id
    if ctx.tenant is not None:
        headers["X-FlatRender-Tenant-Id"] = ctx.tenant.id
        headers["X-FlatRender-Tenant-Slug"] = ctx.tenant.slug
    key = ctx.api_key
    if key is not None:
        headers["X-FlatRender-Api-Key-Id"] = key.id
        headers["X-FlatRender-Key-Environment"] = key.environment
        headers["X-FlatRender-Scopes"] = ",".join(key.scopes)
    return headers


class Forwarder:
    """The request handler at the end of the pipeline; the only code that talks to upstreams."""

    def __init__(
        self,
        max_body_bytes: int,
        body_timeout_s: float,
        telemetry: Telemetry,
        trusted_proxies: Sequence[IPNetwork],
    ) -> None:
        self._max_body = max_body_bytes
        self._body_timeout = body_timeout_s
        self._telemetry = telemetry
        self._trusted = tuple(trusted_proxies)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ctx = request[CTX]
        route, pools = ctx.route, ctx.pools
        assert route is not None and pools is not None  # the route stage ran
        test_key = ctx.api_key is not None and ctx.api_key.environment == "test"
        # The pools of the snapshot the route came from: a reload since cannot miss a name.
        pool = pools[route.test_upstream if test_key and route.test_upstream else route.upstream]
        length = request.content_length
        if length is not None and length > self._max_body:
            raise PayloadTooLarge()
        protocol = request.protocol
        edge = protocol if isinstance(protocol, EdgeRequestHandler) else None
        if edge is not None and edge.departed:
            raise _departure(ctx)  # gone while earlier stages ran: nothing is sent
        headers = upstream_headers(request, ctx, self._trusted)
        target = f"{ctx.path}?{ctx.query}" if ctx.query else ctx.path
        loop = asyncio.get_running_loop()
        started = loop.time()
        with self._telemetry.span("edge.upstream", SpanKind.CLIENT) as span:
            self._telemetry.inject(headers, span, request.headers)
            if span is not None:
                span.set_attribute("flatrender.upstream", pool.name)
            task = asyncio.current_task() if edge is not None else None
            if edge is not None:
                edge.cancel_on_departure(task)
            try:
                response = await self._forward(request, ctx, pool, target, headers, span, edge)
                if edge is not None and edge.departed and isinstance(response, web.Response):
                    # A whole answer is written only after the handler returns: to a client
                    # gone by now it is never delivered, and its row says 499 (CONTRACT §7).
                    raise ClientClosedRequest()
                return response
            except (UpstreamUnavailable, UpstreamTimeout, UpstreamBusy) as e:
                self._telemetry.upstream_error(pool.name, e.code)
                raise
            except ClientClosedRequest:
                raise _departure(ctx) from None
            except asyncio.CancelledError:
                if edge is None or task is None or not edge.departed:
                    raise  # not the client's leaving (a shutdown): stays a cancellation
                task.uncancel()
                raise _departure(ctx) from None
            finally:
                if edge is not None:
                    edge.cancel_on_departure(None)
                    if task is not None and edge.departed and task.cancelling():
                        task.uncancel()  # a cancellation something inside swallowed
                ctx.upstream_s = loop.time() - started

    async def _forward(
        self,
        request: web.Request,
        ctx: RequestContext,
        pool: UpstreamPool,
        target: str,
        headers: CIMultiDict[str],
        span: Span | None,
        edge: EdgeRequestHandler | None,
    ) -> web.StreamResponse:
        if edge is not None and pool.full:
            edge.watch_hangup()  # nothing reads the client while it waits
            try:
                await pool.admit()  # bounded by connect_timeout_s: 503 upstream_busy past it
            finally:
                edge.stop_watching_hangup()
        else:
            await pool.admit()
        try:
            if is_websocket_upgrade(request):
                return await relay_websocket(request, pool, target, headers)
            body = (
                _RequestBody(
                    request.content,
                    self._max_body,
                    self._body_timeout,
                    partial(send_continue, request, ctx),
                )
                if request.body_exists
                else None
            )
            upstream = await self._send(request.method, pool, target, headers, body)
            ctx.upstream_status = upstream.status
            if span is not None:
                span.set_attribute("http.response.status_code", upstream.status)
            return await self._relay(request, upstream, pool)
        finally:
            pool.leave()

    async def _send(
        self,
        method: str,
        pool: UpstreamPool,
        target: str,
        headers: CIMultiDict[str],
        body: _RequestBody | None,
    ) -> aiohttp.ClientResponse:
        error: ProxyError = UpstreamUnavailable()
        for base in pool.rotation():
            try:
                return await pool.session.request(
                    method,
                    # encoded=True: the path and query go out byte for byte, not re-quoted.
                    URL(base + target, encoded=True),
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    compress=None,
                )
            except aiohttp.ClientConnectorError:
                error = UpstreamUnavailable()  # refused or unreachable: it never got the request
            except aiohttp.ConnectionTimeoutError:
                error = UpstreamTimeout()  # connect phase: it never got the request either
            except (aiohttp.SocketTimeoutError, TimeoutError):
                raise UpstreamTimeout() from None
            except (aiohttp.ClientError, _BodyTooLarge, _BodyStalled):
                # The request may have reached the upstream: no failover to another URL.
                if body is not None and body.too_large:
                    raise PayloadTooLarge() from None
                if body is not None and body.stalled:
                    raise RequestBodyTimeout() from None
                if body is not None and body.client_gone:
                    raise ClientClosedRequest() from None
                if body is not None and body.client_failed:
                    # The client's body broke (bad chunk framing, hang-up): its fault, not the
                    # upstream's; the upstream saw a cut-off body, never a complete request.
                    raise BadRequest("malformed or interrupted request body") from None
                raise UpstreamUnavailable() from None
        raise error

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, pool: UpstreamPool
    ) -> web.StreamResponse:
        ctx = request[CTX]
        content = upstream.content
        length = upstream.content_length
        if (
            length is not None
            and length <= WHOLE_BODY_MAX
            and content.is_eof()
            and request.method != "HEAD"
            and upstream.status not in _NO_BODY
        ):
            # The whole body came with the head: one web.Response, written with its head in
            # one write once the handler returns, with no per-chunk machinery. (HEAD, 1xx, 204
            # and 304 declare a length they never send: RFC 9110 §8.6; upgrades never get
            # here, pipeline.websocket relays them.)
            body = _arrived(content)
            if len(body) == length:
                whole = web.Response(status=upstream.status, reason=upstream.reason, body=body)
                _copy_head(upstream, whole)
                stamp_response(request, ctx, whole)
                upstream.release()
                return whole
            first = body  # shorter than declared: the connection is cut below, as before
        else:
            # What arrived with the head, without waiting: sent in the same write as the head,
            # so a server-sent event the upstream sent at once is not held back by a separate
            # write, and nothing waits for a chunk that is not there yet.
            first = _arrived(content)
        response = _Streamed(status=upstream.status, reason=upstream.reason)
        _copy_head(upstream, response)
        if length is not None:
            response.content_length = length
        stamp_response(request, ctx, response)
        read_timeout_s = pool.settings.read_timeout_s
        try:
            await response.prepare(request)
            if first:
                await response.write(first)  # the head goes out with it
                response.body_sent = len(first)
            else:
                request.writer.send_headers()  # nothing yet: the head alone, at once
            chunks = content.iter_any()
            while True:
                # aiohttp's C parser, failing on a response body after good chunks (a bad
                # chunk size), closes the connection and drops the sock_read timer but never
                # ends nor fails the body: the relay would wait forever. This deadline between
                # chunks (read_timeout_s, as documented) turns that into a cut connection.
                try:
                    async with asyncio.timeout(read_timeout_s):
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                await response.write(chunk)
                response.body_sent += len(chunk)
        except ConnectionError:
            # The client went away before its answer was complete: 499 (CONTRACT §7), not an
            # error of ours. aiohttp says so with ConnectionResetError, or, when it happens
            # while a write waits for the socket to drain, with a bare ConnectionError
            # ("Connection lost"). No upstream read failure is a ConnectionError: those are
            # aiohttp.ClientError and TimeoutError, handled below. Close the upstream rather
            # than drain a multi-GB body into nothing.
            upstream.close()
            raise ClientClosedRequest() from None
        except (TimeoutError, aiohttp.ClientError) as e:
            # The upstream failed after the head was sent: the only honest signal left is to
            # cut the client's connection, so a truncated body can never pass for a whole one.
            log.warning("upstream body failed mid-stream: %s", type(e).__name__)
            self._telemetry.upstream_error(pool.name, "body_failed")
            upstream.close()
            if request.transport is not None:
                request.transport.abort()
            return response
        except BaseException:
            upstream.close()
            raise
        upstream.release()
        await response.write_eof()
        return response


# Largest body sent as one web.Response when it arrived whole with the head (measured: see the
# README's performance section).
WHOLE_BODY_MAX = 64 * 1024
_NO_BODY = frozenset({100, 101, 102, 103, 204, 304})


class _Streamed(CountedStream):
    """A streamed answer whose head waits for the first body write and goes out with it (one
    write, as ``web.Response`` does), instead of alone at ``prepare``. aiohttp (3.11+) reads
    this class attribute in ``StreamResponse._write_headers``; ``_relay`` sends the head at
    once itself when no body bytes are there yet."""

    _send_headers_immediately = False


def _arrived(content: aiohttp.StreamReader) -> bytes:
    """The body bytes already received, without waiting. A failed body gives none here: the
    relay's first read raises its error."""
    try:
        return content.read_nowait()
    except aiohttp.ClientError:
        return b""


def _copy_head(upstream: aiohttp.ClientResponse, response: web.StreamResponse) -> None:
    for name, value in response_headers_to_return(list(upstream.headers.items())):
        response.headers.add(name, value)


def _departure(ctx: RequestContext) -> ProxyError:
    """What a request whose connection is gone is recorded as: the client's leaving (499), or
    the malformed body for which the connection itself was closed (400, ``_refuse_body``)."""
    if ctx.body_refused:
        return BadRequest("malformed chunked body")
    return ClientClosedRequest()
