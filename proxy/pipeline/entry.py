"""Outermost stage: request id, client address, rendering of every proxy-made error, and the
once-per-request bookkeeping (metrics, access log, span); ``pipeline.plan`` runs it around
every request.

Errors become the contract's JSON body (CONTRACT §8) here and nowhere else; stages only raise.
``stamp_response`` runs for every response the app sends (proxy-made or from the upstream) and
adds the headers stages collected in the context, ``X-Request-Id`` first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aiohttp import web
from aiohttp.http import HttpVersion11

from proxy.access_log import AccessLog
from proxy.context import CTX, RequestContext
from proxy.core.cors import merge_vary
from proxy.core.forwarding import IPNetwork, client_address, request_id
from proxy.errors import (
    BadRequest,
    InternalError,
    PayloadTooLarge,
    ProxyError,
    error_body,
)
from proxy.telemetry import Telemetry

log = logging.getLogger("proxy.entry")


def error_response(error: ProxyError, rid: str) -> web.Response:
    return web.Response(
        status=error.status,
        body=error_body(error, rid),
        content_type="application/json",
        headers=error.headers,
    )


def as_proxy_error(exc: Exception) -> ProxyError:
    """The contract error an exception out of the stages is answered with: itself, aiohttp's
    own refusals (e.g. a body over ``client_max_size``) mapped, anything else a 500. The audit
    stage records what this answers, so its rows and the answers agree."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, web.HTTPException):
        if exc.status == 413:
            return PayloadTooLarge()
        if 400 <= exc.status < 500:
            return BadRequest(exc.reason)
    return InternalError()


def new_context(
    request: web.Request, trusted: Sequence[IPNetwork], started: float
) -> RequestContext:
    """The request's context: its id and the client's address (CONTRACT §7)."""
    headers = request.headers
    ctx = RequestContext(request_id=request_id(headers.get("X-Request-Id")), started=started)
    xff = headers.getall("X-Forwarded-For", None)
    ctx.client_ip, ctx.forwarded_for = client_address(
        request.remote or "", ", ".join(xff) if xff else None, trusted
    )
    request[CTX] = ctx
    return ctx


def failure_response(exc: Exception, ctx: RequestContext) -> web.Response:
    """The answer to what a stage raised: its contract error, or a 500 for anything else."""
    error = as_proxy_error(exc)
    if not isinstance(exc, ProxyError | web.HTTPException):
        log.error("unhandled error request_id=%s", ctx.request_id, exc_info=exc)
    ctx.error_code = error.code
    response = error_response(error, ctx.request_id)
    if error.status in (400, 408, 505):
        # After a malformed request the connection is not trusted with another one: its framing
        # may be off by any number of bytes (nginx closes after a 400 too). After a stalled
        # body the rest of it may still arrive: 408 means closing (RFC 9110 §15.5.9). After a
        # 505 the rest of the message is in a framing this server does not speak.
        response.force_close()
    return response


def finish(
    request: web.Request,
    ctx: RequestContext,
    status: int,
    sent: int,
    elapsed: float,
    telemetry: Telemetry,
    access: AccessLog | None,
) -> None:
    """Metrics, the access-log line and the server span's attributes, once per request."""
    route = ctx.route.prefix if ctx.route else "none"
    telemetry.observe(route, status, elapsed)
    if access is not None:
        access.record(ctx, request.method, status, elapsed, sent)
    span = ctx.span
    if span is not None:
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("flatrender.request_id", ctx.request_id)
        span.set_attribute("flatrender.route", route)
        if ctx.tenant is not None:
            span.set_attribute("flatrender.tenant_id", ctx.tenant.id)
        if ctx.api_key is not None:
            span.set_attribute("flatrender.api_key_id", ctx.api_key.id)
        if ctx.limit_decision is not None:
            span.set_attribute("flatrender.limiter", ctx.limit_decision)


class CountedStream(web.StreamResponse):
    """A streamed answer whose writer adds up the body bytes it writes in ``body_sent``:
    aiohttp's own figure (``body_length``) counts the head and any chunk framing too."""

    body_sent = 0


def body_bytes(method: str, response: web.StreamResponse) -> int:
    """Body bytes sent (nginx's ``$body_bytes_sent``), the same figure whichever way the
    answer goes out. A streamed answer has been written by now; a ``web.Response`` is written
    after the handler returns, so its body's length is the figure (none for HEAD, RFC 9110
    §9.3.2)."""
    if isinstance(response, CountedStream):
        return response.body_sent
    body = response.body if isinstance(response, web.Response) else None
    if isinstance(body, bytes):
        return 0 if method == "HEAD" else len(body)
    return response.body_length


def awaits_continue(request: web.BaseRequest) -> bool:
    """The client waits for ``100 Continue`` before it sends its body (RFC 9110 §10.1.1;
    HTTP/1.1 only, as aiohttp has it)."""
    return (
        request.version == HttpVersion11
        and request.body_exists
        and request.headers.get("Expect", "").lower() == "100-continue"
    )


async def send_continue(request: web.BaseRequest, ctx: RequestContext) -> None:
    """The interim answer, sent when the forwarder starts reading the body: by then the
    request passed routing, authentication and the rate limit, so a client is never invited to
    upload a body the proxy then refuses (nginx also sends it only when it reads the body)."""
    if awaits_continue(request) and not ctx.continue_sent:
        ctx.continue_sent = True
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not the response's start


async def expect_handler(request: web.Request) -> None:
    """``Expect`` handling for the catch-all route, which aiohttp's router runs before the
    handler (for an application served by aiohttp's own runner: ``serve`` hands requests to
    the pipeline without the router, and so without this).

    It answers nothing. aiohttp's default sends ``100 Continue`` at once, before any stage has
    looked at the request (``send_continue`` does it when the body is read), and answers any
    other expectation with a text/plain 417 of its own, outside the pipeline: no contract
    JSON, no request id. RFC 9110 §10.1.1 makes that 417 a MAY, and the forwarder drops
    ``Expect``, so an unknown expectation is ignored and the request goes through the pipeline
    like any other."""


def stamp_response(
    request: web.BaseRequest, ctx: RequestContext, response: web.StreamResponse
) -> None:
    """Headers every answer carries, whoever produced it: called where each answer is built,
    before its head is written (the proxy's own answers in ``pipeline.plan``, the upstream's
    in ``pipeline.forward`` and ``pipeline.websocket``)."""
    headers = response.headers
    headers["X-Request-Id"] = ctx.request_id
    if awaits_continue(request) and not ctx.continue_sent:
        # A final answer to a client still waiting to send its body: it may send the body
        # anyway, after its own timeout, so the connection cannot carry another request
        # (RFC 9110 §10.1.1: the server closes, or reads and discards the body).
        response.force_close()
        headers["Connection"] = "close"
    for name, value in ctx.response_headers.items():
        if name == "Vary":
            # An upstream may send several Vary lines (RFC 9110 §5.3: one list); setting the
            # header replaces them all, so merge every one, not just the first.
            upstream_vary = ", ".join(headers.getall("Vary", ()))
            headers["Vary"] = merge_vary(upstream_vary or None, value)
        elif name == "Content-Security-Policy":
            headers.add(name, value)  # an upstream policy stays: browsers enforce both
        else:
            headers[name] = value
