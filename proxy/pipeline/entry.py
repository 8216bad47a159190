"""Outermost stage: request id, client address, and rendering of every proxy-made error.

Errors become the contract's JSON body (CONTRACT §8) here and nowhere else; stages only raise.
``stamp_response`` runs for every response the app sends (proxy-made or streamed from the
upstream) and adds the headers stages collected in the context, ``X-Request-Id`` first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.typedefs import Handler, Middleware

from proxy.access_log import AccessLog
from proxy.context import CTX, UNSERVED_VERSION, RequestContext
from proxy.core.cors import merge_vary
from proxy.core.forwarding import IPNetwork, client_address, request_id
from proxy.errors import (
    BadRequest,
    HttpVersionNotSupported,
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


def entry_stage(
    trusted_proxies: Sequence[IPNetwork], telemetry: Telemetry, access: AccessLog | None
) -> Middleware:
    trusted = tuple(trusted_proxies)

    @web.middleware
    async def entry(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = request.headers
        xff = headers.getall("X-Forwarded-For", None)
        loop = asyncio.get_running_loop()
        ctx = RequestContext(
            request_id=request_id(headers.get("X-Request-Id")), started=loop.time()
        )
        ctx.client_ip, ctx.forwarded_for = client_address(
            request.remote or "", ", ".join(xff) if xff else None, trusted
        )
        request[CTX] = ctx
        status, sent = 500, 0
        with telemetry.server_span(request.method, headers) as span:
            ctx.span = span
            try:
                response = await _answer(request, handler, ctx)
                status, sent = response.status, _body_bytes(request.method, response)
                return response
            except (asyncio.CancelledError, ConnectionResetError):
                status = 499
                raise
            finally:
                route = ctx.route.prefix if ctx.route else "none"
                elapsed = loop.time() - ctx.started
                telemetry.observe(route, status, elapsed)
                if access is not None:
                    access.record(ctx, request.method, status, elapsed, sent)
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

    return entry


def _body_bytes(method: str, response: web.StreamResponse) -> int:
    """Body bytes sent (nginx's ``$body_bytes_sent``). A streamed answer has been written by
    now; a ``web.Response`` (the proxy's own JSON errors) is written after this stage returns,
    so its body's length is the figure (none for HEAD, RFC 9110 §9.3.2)."""
    body = response.body if isinstance(response, web.Response) else None
    if isinstance(body, bytes) and method != "HEAD":
        return len(body)
    return response.body_length


async def _answer(
    request: web.Request, handler: Handler, ctx: RequestContext
) -> web.StreamResponse:
    try:
        if UNSERVED_VERSION in request:
            raise HttpVersionNotSupported()
        return await handler(request)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:
        error = as_proxy_error(e)
        if not isinstance(e, ProxyError | web.HTTPException):
            log.exception("unhandled error request_id=%s", ctx.request_id)
    ctx.error_code = error.code
    response = error_response(error, ctx.request_id)
    if error.status in (400, 408, 505):
        # After a malformed request the connection is not trusted with another one: its framing
        # may be off by any number of bytes (nginx closes after a 400 too). After a stalled
        # body the rest of it may still arrive: 408 means closing (RFC 9110 §15.5.9). After a
        # 505 the rest of the message is in a framing this server does not speak.
        response.force_close()
    return response


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
    """``Expect`` handling for the catch-all route; aiohttp runs it before any middleware.

    It answers nothing. aiohttp's default sends ``100 Continue`` at once, before any stage has
    looked at the request (``send_continue`` does it when the body is read), and answers any
    other expectation with a text/plain 417 of its own, outside the pipeline: no contract
    JSON, no request id. RFC 9110 §10.1.1 makes that 417 a MAY, and the forwarder drops
    ``Expect``, so an unknown expectation is ignored and the request goes through the pipeline
    like any other."""


async def stamp_response(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: headers every answer carries, whoever produced it."""
    ctx: RequestContext | None = request.get(CTX)
    if ctx is None:
        return
    headers = response.headers
    headers["X-Request-Id"] = ctx.request_id
    if awaits_continue(request) and not ctx.continue_sent:
        # A final answer to a client still waiting to send its body: it may send the body
        # anyway, after its own timeout, so the connection cannot carry another request
        # (RFC 9110 §10.1.1: the server closes, or reads and discards the body). aiohttp has
        # derived its Connection header before this hook runs: say it here too.
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
