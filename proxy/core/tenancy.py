"""Tenants as the proxy sees them, and the status rules of CONTRACT §3."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from proxy.core.cors import CorsPolicy, build_policy
from proxy.errors import TenantCancelled, TenantSuspended, TrialExpired

TenantStatus = Literal["Active", "Trial", "Suspended", "Cancelled"]
DEFAULT_TENANT_ID = "00000000-0000-0000-0000-000000000001"


@dataclass(frozen=True, slots=True)
class Branding:
    embed_enabled: bool = False
    embed_allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    slug: str
    status: TenantStatus
    custom_domain: str | None = None
    domain_verified: bool = False
    allowed_origins: tuple[str, ...] = ()
    trial_ends_at: datetime | None = None
    branding: Branding | None = None
    features: dict[str, object] = field(default_factory=dict, compare=False, hash=False)
    monthly_render_qty: int | None = None  # renders per UTC month (CONTRACT §13); None: unlimited
    # Compiled once when the tenant is loaded, never per request.
    cors: CorsPolicy = field(init=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cors", build_policy(self.allowed_origins, self.custom_domain))


def check_status(tenant: Tenant, now: datetime) -> None:
    """Raise the contract error for a tenant that may not be served at ``now``."""
    if tenant.status == "Active":
        return
    if tenant.status == "Trial":
        if tenant.trial_ends_at is not None and now >= tenant.trial_ends_at:
            raise TrialExpired()
        return
    if tenant.status == "Suspended":
        raise TenantSuspended()
    raise TenantCancelled()
