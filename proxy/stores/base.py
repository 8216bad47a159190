"""The narrow interfaces stages use to reach data; one Protocol per store (DESIGN).

Implementations map their own exceptions to ``proxy.errors`` at this boundary.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Literal, Protocol

from proxy.audit.record import AuditRecord
from proxy.core.apikeys import ApiKey
from proxy.core.bucket import Decision
from proxy.core.tenancy import Tenant

if TYPE_CHECKING:
    from proxy.stores.quota import QuotaCounters, QuotaDecision, Reservation


class Missing(enum.Enum):
    """What a store's ``cached_*`` answers when the answer needs a load: the caller awaits the
    async lookup then. A cache hit costs no coroutine and no await."""

    MISSING = enum.auto()


MISSING = Missing.MISSING
TenantKind = Literal["domain", "slug", "id"]


class TenantStore(Protocol):
    def cached_tenant(self, kind: TenantKind, value: str) -> Tenant | Missing | None:
        """The answer ``by_custom_domain`` ("domain"), ``by_slug`` ("slug") or ``by_id``
        ("id") would give, if it is at hand without waiting; else ``MISSING``."""

    async def by_custom_domain(self, host: str) -> Tenant | None:
        """The live (not deleted) tenant whose ``custom_domain`` is ``host``, verified or not."""

    async def by_slug(self, slug: str) -> Tenant | None:
        """The live tenant with this slug."""

    async def by_id(self, tenant_id: str) -> Tenant | None:
        """The live tenant with this id."""


class ChallengeStore(Protocol):
    async def challenge_valid(self, domain: str, token: str, now: datetime) -> bool:
        """An unexpired HTTP_FILE verification row exists for ``domain`` and ``token``."""


class KeyStore(Protocol):
    def cached_keys(self, prefix: str) -> Sequence[ApiKey] | Missing:
        """What ``by_prefix`` would answer, if it is at hand without waiting; else ``MISSING``."""

    async def by_prefix(self, prefix: str) -> Sequence[ApiKey]:
        """Every key row whose ``key_prefix`` is ``prefix`` (active or not: the stage decides)."""

    async def key_by_id(self, key_id: str) -> ApiKey | None:
        """The key row with this id (a UUID), active or not; ``/explain`` names keys this way,
        never by the key itself."""


class BucketStore(Protocol):
    async def take(self, bucket: str, capacity: int) -> Decision:
        """Take one token from ``bucket`` (capacity ``capacity`` per minute) if there is one."""

    async def peek(self, bucket: str, capacity: int) -> Decision:
        """What ``take`` would report, taking nothing."""

    async def ready(self) -> bool:
        """False when decisions cannot be made as configured."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class QuotaStore(Protocol):
    """Monthly render quota (CONTRACT §13): reserve at admission, settle on the answer."""

    counters: QuotaCounters  # decisions and settlements, read by /metrics

    async def reserve(self, tenant_id: str, quota: int, now: datetime) -> QuotaDecision:
        """A unit of ``quota`` for ``now``'s UTC month, if one is free."""

    async def peek(self, tenant_id: str, quota: int, now: datetime) -> QuotaDecision:
        """What ``reserve`` would decide now (``left``: before this request), reserving,
        writing and counting nothing."""

    def settle(
        self, tenant_id: str, month: str, reservation: Reservation | None, started: bool
    ) -> None:
        """Keep the unit (the upstream answered 2xx: a render started) or give it back; with
        no reservation (an unlimited tenant), count a render started. Never waits."""

    async def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class AuditSink(Protocol):
    def submit(self, record: AuditRecord) -> None:
        """Queue one row; never waits (the request path must not block on audit I/O)."""

    async def start(self) -> None:
        """Begin flushing in the background."""

    async def close(self) -> None:
        """Write everything submitted so far, then stop."""


class UsageSink(Protocol):
    def record(self, key_id: str, at: datetime, ip: str | None) -> None:
        """Count one use of a key; never waits."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...
