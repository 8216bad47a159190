"""One JSON line per request (orjson), through aiohttp's access-log hook, which runs after the
last byte was sent. Never the key, never the query string (it may carry secrets such as signed
URLs): the path logged is the resolved path the route saw."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from proxy.context import CTX

ACCESS_LOGGER = "proxy.access"


class JsonAccessLogger(AbstractAccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        ctx = request.get(CTX)
        line = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": ctx.request_id if ctx else None,
            "method": request.method,
            "host": ctx.host if ctx else None,
            "path": ctx.path if ctx and ctx.path else None,
            "status": response.status,
            "route": ctx.route.prefix if ctx and ctx.route else None,
            "tenant_id": ctx.tenant.id if ctx and ctx.tenant else None,
            "api_key_id": ctx.api_key.id if ctx and ctx.api_key else None,
            "client_ip": ctx.client_ip if ctx else request.remote,
            "limiter": ctx.limit_decision if ctx else None,
            "error": ctx.error_code if ctx else None,
            "duration_ms": round(time * 1000, 3),
            "upstream_ms": round(ctx.upstream_s * 1000, 3) if ctx else 0.0,
            "bytes_sent": response.body_length,
        }
        self.logger.info(orjson.dumps(line).decode())


def access_logger() -> logging.Logger:
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.setLevel(logging.INFO)
    return logger
