"""One audit row, shaped like ``identity.tenant_api_request_logs`` (CONTRACT §9).

``as_json_row`` is the format of the embedded JSON-lines file and of the database-mode spool;
``from_json_row`` reads it back exactly (``created_at`` keeps its microseconds, which matters:
``(request_id, created_at)`` is what makes a replayed row a duplicate).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class AuditRecord:
    created_at: datetime  # UTC
    tenant_id: str
    api_key_id: str | None
    method: str
    path: str  # without the query string, which may hold secrets
    status_code: int
    duration_ms: int
    request_id: str
    ip_address: str | None
    user_agent: str | None
    error_message: str | None  # the contract error code for proxy-made errors
    # A POST on a metered route that the upstream answered 2xx: one render started (§13).
    render_started: bool = False

    def as_json_row(self) -> dict[str, object]:
        return {
            "created_at": self.created_at.isoformat(),
            "tenant_id": self.tenant_id,
            "api_key_id": self.api_key_id,
            "method": self.method,
            "path": self.path,
            "status_code": self.status_code,
            "duration_ms": self.duration_ms,
            "request_id": self.request_id,
            "ip_address": self.ip_address,
            "user_agent": self.user_agent,
            "error_message": self.error_message,
            "render_started": self.render_started,
        }

    @classmethod
    def from_json_row(cls, row: dict[str, Any]) -> AuditRecord:
        """Raises ``KeyError``, ``TypeError`` or ``ValueError`` on a row not made by
        ``as_json_row``."""
        created_at = datetime.fromisoformat(row["created_at"])
        if created_at.tzinfo is None:
            raise ValueError("created_at without a UTC offset")
        return cls(
            created_at=created_at,
            tenant_id=_text(row["tenant_id"]),
            api_key_id=_opt_text(row["api_key_id"]),
            method=_text(row["method"]),
            path=_text(row["path"]),
            status_code=_int(row["status_code"]),
            duration_ms=_int(row["duration_ms"]),
            request_id=_text(row["request_id"]),
            ip_address=_opt_text(row["ip_address"]),
            user_agent=_opt_text(row["user_agent"]),
            error_message=_opt_text(row["error_message"]),
            render_started=row.get("render_started", False) is True,  # absent in older files
        )


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _opt_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value
