"""The proxy's own errors: each one knows its HTTP status and contract code (CONTRACT §8).

Stages raise these; the outermost stage (``pipeline.entry``) renders the JSON body with
``error_body``, as does ``connection`` for what is refused before a request reaches the stages.
Third-party exceptions are mapped to these at the store or forwarding boundary, so no stage sees
asyncpg, redis or aiohttp-client exceptions.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson


class ProxyError(Exception):
    """An error the proxy answers itself: ``status``, contract ``code`` and a human message."""

    status: int = 500
    code: str = "internal_error"
    message: str = "internal error"

    def __init__(self, message: str | None = None, *, headers: Mapping[str, str] | None = None):
        super().__init__(message or self.message)
        if message is not None:
            self.message = message
        self.headers: Mapping[str, str] = headers or {}


def error_body(error: ProxyError, request_id: str) -> bytes:
    """The contract's JSON body of an error (CONTRACT §8), the one place it is built."""
    return orjson.dumps(
        {"error": {"code": error.code, "message": error.message, "request_id": request_id}}
    )


class Unauthorized(ProxyError):
    """A 401: RFC 6750 §3 (and RFC 9110 §15.5.2) make every one carry ``WWW-Authenticate``
    naming the scheme. CONTRACT §5 fixes its value to the bare ``Bearer`` for every 401 (RFC
    6750 §3.1 makes the ``error`` parameter optional); the JSON body's code says why."""

    status = 401

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class BadRequest(ProxyError):
    status, code, message = 400, "bad_request", "malformed request"


class NoRoute(ProxyError):
    status, code, message = 404, "no_route", "no route matches this path"


class UnknownHost(ProxyError):
    status, code, message = 404, "unknown_host", "this host is not served here"


class DomainNotVerified(ProxyError):
    status, code, message = 421, "domain_not_verified", "the custom domain is not verified"


class TrialExpired(ProxyError):
    status, code, message = 402, "trial_expired", "the tenant's trial has ended"


class TenantSuspended(ProxyError):
    status, code, message = 403, "tenant_suspended", "the tenant is suspended"


class TenantCancelled(ProxyError):
    status, code, message = 410, "tenant_cancelled", "the tenant is cancelled"


class OriginNotAllowed(ProxyError):
    status, code, message = 403, "origin_not_allowed", "this origin may not call this API"


class ChallengeNotFound(ProxyError):
    status, code, message = 404, "challenge_not_found", "no such domain-verification challenge"


class MissingApiKey(Unauthorized):
    code, message = "missing_api_key", "an API key is required"


class InvalidApiKey(Unauthorized):
    code, message = "invalid_api_key", "the API key is not valid"


class ApiKeyExpired(Unauthorized):
    code, message = "api_key_expired", "the API key has expired"


class ApiKeyRevoked(Unauthorized):
    code, message = "api_key_revoked", "the API key has been revoked"


class TenantMismatch(ProxyError):
    status, code, message = 403, "tenant_mismatch", "the API key belongs to another tenant"


class IpNotAllowed(ProxyError):
    status, code, message = 403, "ip_not_allowed", "the client address is not allowed for this key"


class InsufficientScope(ProxyError):
    status, code, message = 403, "insufficient_scope", "the API key lacks the required scope"


class RateLimited(ProxyError):
    status, code, message = 429, "rate_limited", "rate limit exceeded"


class RenderQuotaExceeded(ProxyError):
    status, code = 429, "render_quota_exceeded"
    message = "the monthly render quota is used up"


class RateLimiterUnavailable(ProxyError):
    status, code, message = 503, "rate_limiter_unavailable", "rate limiter unavailable"


class PayloadTooLarge(ProxyError):
    status, code, message = 413, "payload_too_large", "request body exceeds the size limit"


class HeadersTooLarge(ProxyError):
    """431 (RFC 6585 §5): the request line, a header field, or the number of fields is over
    the limit."""

    status, code = 431, "request_header_fields_too_large"
    message = "request head exceeds the size limit"


class ClientClosedRequest(ProxyError):
    # nginx's 499: the client went away mid-request. Nobody reads this answer; the status is
    # for the audit row, the access log and the metrics, which must not blame the request.
    status, code = 499, "client_closed_request"
    message = "the client closed the connection before the request was complete"


class RequestBodyTimeout(ProxyError):
    # RFC 9110 §15.5.9; the connection is closed after it (the rest of the body may still come).
    status, code = 408, "request_timeout"
    message = "the request body stalled for longer than body_timeout_s"


class HttpVersionNotSupported(ProxyError):
    # RFC 9110 §15.6.6: only HTTP/1.0 and HTTP/1.1 are served on this listener.
    status, code = 505, "http_version_not_supported"
    message = "only HTTP/1.0 and HTTP/1.1 are served here"


class UpstreamUnavailable(ProxyError):
    status, code, message = 502, "upstream_unavailable", "the upstream service is unreachable"


class UpstreamTimeout(ProxyError):
    status, code, message = 504, "upstream_timeout", "the upstream service did not answer in time"


class UpstreamBusy(ProxyError):
    # CONTRACT §7: every connection of the upstream's pool stayed in use for connect_timeout_s;
    # the upstream was not contacted. Retry-After (RFC 9110 §10.2.3): a pool frees up quickly.
    status, code, message = 503, "upstream_busy", "the upstream service is busy"

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "1"})


class TenantStoreUnavailable(ProxyError):
    status, code, message = 503, "tenant_store_unavailable", "tenant store unavailable"


class InternalError(ProxyError):
    """An unexpected exception; the message never carries its details to the client."""
