"""One audit row, shaped like ``identity.tenant_api_request_logs`` (CONTRACT §9)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


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
        }
