"""The access-log line: formatted from a template, byte for byte the JSON object it has always
been (the keys, their order, null for what is missing), with the time formatted once per
millisecond."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import orjson
import pytest

from proxy.access_log import AccessLog
from proxy.context import RequestContext
from proxy.core.apikeys import ApiKey
from proxy.core.tenancy import Tenant
from proxy.settings import RouteSettings

# 2026-11-25T10:20:30.456789Z
NOW_NS = int(datetime(2026, 11, 25, 10, 20, 30, 456789, tzinfo=UTC).timestamp() * 1e6) * 1000


def _line(ctx: RequestContext, clock_ns: int = NOW_NS, **kw: object) -> bytes:
    log = AccessLog(io.BytesIO(), clock_ns=lambda: clock_ns)
    args: dict[str, object] = {"method": "GET", "status": 200, "seconds": 0.0012345}
    args["bytes_sent"] = 16
    args.update(kw)
    log.record(ctx, **args)  # type: ignore[arg-type]
    (line,) = log._lines
    return line


def _as_dict(ctx: RequestContext, time: str, method: str, status: int, ms: float) -> bytes:
    """The line as a dict serialised by orjson: what the log wrote before the template."""
    return orjson.dumps(
        {
            "time": time,
            "request_id": ctx.request_id,
            "method": method,
            "host": ctx.host or None,
            "path": ctx.path or None,
            "status": status,
            "route": ctx.route.prefix if ctx.route else None,
            "tenant_id": ctx.tenant.id if ctx.tenant else None,
            "api_key_id": ctx.api_key.id if ctx.api_key else None,
            "client_ip": ctx.client_ip or None,
            "limiter": ctx.limit_decision,
            "error": ctx.error_code,
            "duration_ms": ms,
            "upstream_ms": round(ctx.upstream_s * 1000, 3),
            "bytes_sent": 16,
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )


RID = "6a1f9b7c-4e01-4c1a-8d2e-3b0d7a525f0e"


def _full() -> RequestContext:
    ctx = RequestContext(request_id=RID, started=0.0, client_ip="203.0.113.9")
    ctx.host, ctx.path = "videos.acme.test", '/v1/renders/"quoted"\\é\u2028'
    ctx.route = RouteSettings(prefix="/v1/renders", upstream="u")
    ctx.tenant = Tenant(id="6f1c1f9e-8a51-4d7e-9a44-2b7c0d9c1a01", slug="acme", status="Active")
    ctx.api_key = ApiKey("key-1", ctx.tenant.id, "live", "fr_live_abcd", "0" * 64)
    ctx.limit_decision, ctx.upstream_s = "allowed", 0.00098765
    return ctx


def test_a_full_line_is_pinned() -> None:
    assert _line(_full()) == (
        b'{"time":"2026-11-25T10:20:30.456+00:00","request_id":"' + RID.encode() + b'",'
        b'"method":"GET","host":"videos.acme.test","path":"/v1/renders/\\"quoted\\"\\\\'
        + "é\u2028".encode()
        + b'","status":200,"route":"/v1/renders",'
        b'"tenant_id":"6f1c1f9e-8a51-4d7e-9a44-2b7c0d9c1a01","api_key_id":"key-1",'
        b'"client_ip":"203.0.113.9","limiter":"allowed","error":null,'
        b'"duration_ms":1.234,"upstream_ms":0.988,"bytes_sent":16}\n'
    )


def test_an_early_refusal_has_nulls() -> None:
    ctx = RequestContext(request_id=RID, started=0.0)
    ctx.error_code = "bad_request"
    line = _line(ctx, method="BREW", status=400, seconds=0.0)
    assert line == _as_dict(ctx, "2026-11-25T10:20:30.456+00:00", "BREW", 400, 0.0)
    assert b'"host":null,"path":null,"status":400,"route":null' in line


@pytest.mark.parametrize("seconds", [0.0, 0.0004, 0.0012345, 1.5, 12.3456789, 3600.0])
def test_the_line_is_the_dict_it_replaced(seconds: float) -> None:
    ctx = _full()
    ms = round(seconds * 1000, 3)
    assert _line(ctx, seconds=seconds) == _as_dict(
        ctx, "2026-11-25T10:20:30.456+00:00", "GET", 200, ms
    )


def test_the_time_is_formatted_per_millisecond() -> None:
    now = [NOW_NS]
    log = AccessLog(io.BytesIO(), clock_ns=lambda: now[0])
    ctx = RequestContext(request_id=RID, started=0.0)
    for at in (NOW_NS, NOW_NS + 200_000, NOW_NS + 544_000_000, 1_764_028_800_999_999_999):
        now[0] = at
        log.record(ctx, "GET", 200, 0.0, 0)
    stamps = [orjson.loads(line)["time"] for line in log._lines]
    assert stamps == [
        "2026-11-25T10:20:30.456+00:00",
        "2026-11-25T10:20:30.456+00:00",  # same millisecond: the formatted one, reused
        "2026-11-25T10:20:31.000+00:00",  # the next one, across a second
        "2025-11-25T00:00:00.999+00:00",
    ]
