"""Shared by the audit tests: records, settings, a proxy's configuration, polling, and the
metering invariant of §9."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson

from proxy.audit.record import AuditRecord
from proxy.settings import AuditSettings
from tests.procs import Echo, free_port, write_config

DEFAULT_TENANT = "00000000-0000-0000-0000-000000000001"
_BASE = datetime.now(UTC).replace(microsecond=0)


def record(i: int = 0, **fields: object) -> AuditRecord:
    """A distinct row (its own request id and microsecond) in the current month by default."""
    values: dict[str, object] = {
        "created_at": _BASE + timedelta(microseconds=i),
        "tenant_id": DEFAULT_TENANT,
        "api_key_id": None,
        "method": "GET",
        "path": f"/v1/renders/{i}",
        "status_code": 200,
        "duration_ms": 2,
        "request_id": str(uuid.uuid4()),
        "ip_address": "203.0.113.7",
        "user_agent": "bench/1.0",
        "error_message": None,
    }
    values.update(fields)
    return AuditRecord(**values)  # type: ignore[arg-type]


def settings(spool_dir: Path, **overrides: object) -> AuditSettings:
    values: dict[str, object] = {
        "flush_interval_ms": 20,
        "spool_dir": spool_dir,
        "batch_max_rows": 100,
        "buffer_max_rows": 1000,
        "write_timeout_s": 2.0,
        "drain_timeout_s": 2.0,
    }
    values.update(overrides)
    return AuditSettings(**values)  # type: ignore[arg-type]


async def count_rows(conn: asyncpg.Connection) -> int:
    n: int = await conn.fetchval("SELECT count(*) FROM identity.tenant_api_request_logs")
    return n


async def copies(conn: asyncpg.Connection, request_ids: list[str]) -> dict[str, int]:
    """How many rows each request id has (ids with none are absent)."""
    rows = await conn.fetch(
        "SELECT request_id::text AS id, count(*) AS n FROM identity.tenant_api_request_logs"
        " WHERE request_id = ANY($1::uuid[]) GROUP BY 1",
        request_ids,
    )
    return {r["id"]: r["n"] for r in rows}


# CONTRACT §9: tenant_usage_daily agrees with the rows exactly, per tenant and UTC day (for
# tenants that exist: a hard-deleted tenant's usage rows went with it, ON DELETE CASCADE).
USAGE_MISMATCHES = """
WITH logs AS (
    SELECT tenant_id, (created_at AT TIME ZONE 'UTC')::date AS usage_date,
           count(*) AS calls,
           count(*) FILTER (WHERE status_code BETWEEN 400 AND 499) AS c4xx,
           count(*) FILTER (WHERE status_code BETWEEN 500 AND 599) AS c5xx
      FROM identity.tenant_api_request_logs
     GROUP BY 1, 2
)
SELECT coalesce(l.tenant_id, u.tenant_id)::text AS tenant_id,
       coalesce(l.usage_date, u.usage_date) AS usage_date,
       l.calls, l.c4xx, l.c5xx, u.api_calls, u.api_4xx, u.api_5xx
  FROM logs l
  FULL JOIN identity.tenant_usage_daily u
    ON u.tenant_id = l.tenant_id AND u.usage_date = l.usage_date
 WHERE coalesce(l.tenant_id, u.tenant_id) IN (SELECT id FROM identity.tenants)
   AND (coalesce(l.calls, 0) <> coalesce(u.api_calls, 0)
        OR coalesce(l.c4xx, 0) <> coalesce(u.api_4xx, 0)
        OR coalesce(l.c5xx, 0) <> coalesce(u.api_5xx, 0))
"""


async def assert_usage_matches_rows(conn: asyncpg.Connection) -> None:
    mismatches = [dict(r) for r in await conn.fetch(USAGE_MISMATCHES)]
    assert mismatches == []


def proxy_config(tmp: Path, echo: Echo, **audit: object) -> Path:
    """A proxy with audited routes: keyed (``/v1/renders``), open (``/public``), one whose
    upstream refuses (``/v1/dead``: the proxy's own 502), and an unaudited ``/v1/optional``."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: 502 upstream_unavailable
    path = write_config(
        tmp / "edge.toml",
        server={"trusted_proxies": ["127.0.0.1/32"]},
        tenancy={"platform_domains": ["flatrender.test"]},
        upstreams={"render-api": {"urls": [echo.url]}, "dead": {"urls": [dead]}},
        routes=[
            {
                "prefix": "/v1/renders",
                "upstream": "render-api",
                "auth": "api_key",
                "scopes": {"GET": "renders:read", "POST": "renders:create"},
                "audit": True,
            },
            {"prefix": "/v1/dead", "upstream": "dead", "auth": "none", "audit": True},
            {"prefix": "/public", "upstream": "render-api", "auth": "none", "audit": True},
            {"prefix": "/v1/optional", "upstream": "render-api", "auth": "optional"},
        ],
    )
    settings = {"flush_interval_ms": 50, "spool_dir": str(tmp / "spool"), **audit}
    lines = [f"{k} = {orjson.dumps(v).decode()}" for k, v in settings.items()]
    path.write_text(path.read_text() + "\n[audit]\n" + "\n".join(lines) + "\n")
    return path
