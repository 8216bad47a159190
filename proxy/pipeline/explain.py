"""``GET /explain`` on the admin listener (CONTRACT §10): what the public listener would answer
a request now, and why, without making it.

Each step asks what its stage asks, in the stage's order (``pipeline.plan``): the challenge
(``routing.challenge_token``), the tenant (``tenant.resolve_tenant``), CORS (the tenant's
compiled policy), the route (the plans in force), access (``core.access.admit``, the key's
tenant from ``auth.key_tenant``), the render quota (``core.quota.applicable_quota`` and the
quota store's ``peek``) and the rate limit (``ratelimit.bucket_of``, ``peek``, ``shadowed``).
Nothing is taken or written: the limiter and the quota are peeked at (no token, no unit, no
counter), no audit row is queued, no key use recorded, no upstream contacted. A key is named
by its row's id: the key itself never reaches the admin listener.

``answer`` is the first refusal in that order; the members after it are still reported where
their inputs are known (a suspended tenant's request still shows its route and its key's
verdict), since "what else would stop it" is the next question an operator asks.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from proxy.context import RequestContext
from proxy.core.access import admit
from proxy.core.apikeys import ApiKey, authorize, required_scope
from proxy.core.hosts import BadHost, classify_host, normalize_host
from proxy.core.paths import BadTarget, split_target
from proxy.core.quota import applicable_quota, seconds_until_next_month
from proxy.core.tenancy import Tenant
from proxy.errors import (
    BadRequest,
    ChallengeNotFound,
    InvalidApiKey,
    NoRoute,
    OriginNotAllowed,
    ProxyError,
    RateLimited,
    RenderQuotaExceeded,
)
from proxy.pipeline.auth import key_tenant
from proxy.pipeline.ratelimit import applies_to, bucket_of, peek, shadowed
from proxy.pipeline.routing import challenge_target, challenge_token
from proxy.pipeline.tenant import resolve_tenant
from proxy.settings import RatelimitSettings, RouteSettings
from proxy.stores.base import BucketStore, ChallengeStore, KeyStore, QuotaStore, TenantStore

# RFC 9110 §9.1: a method is a token (§5.6.2).
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}")
# What ``classify_host`` says about the Host, as the contract names the rule (§3).
_RULES = {"other": "custom_domain", "slug": "slug", "platform": "platform"}


@dataclass(frozen=True, slots=True)
class Query:
    """The request to explain."""

    host: str  # normalised (CONTRACT §3)
    path: str  # resolved (CONTRACT §7)
    method: str
    origin: str | None
    key_id: str | None  # a key row's id (lower-case UUID); None: no key presented
    client_ip: str


def parse_query(params: Mapping[str, str], caller_ip: str) -> Query:
    """The query string of ``/explain``; ``BadRequest`` for a missing or malformed ``host`` or
    ``path``, a ``key_id`` that is not a UUID, or a malformed ``method`` or ``client_ip``.
    ``method`` defaults to GET, ``client_ip`` to the admin caller's address."""
    raw_host, raw_path = params.get("host"), params.get("path")
    if not raw_host or not raw_path:
        raise BadRequest("host and path are required")
    try:
        host = normalize_host(raw_host)
        path, _ = split_target(raw_path, raw_host)
    except (BadHost, BadTarget) as e:
        raise BadRequest(str(e)) from None
    method = params.get("method", "GET")
    if not _METHOD.fullmatch(method):
        raise BadRequest("method is not an HTTP method")
    key_id = params.get("key_id")
    if key_id is not None:
        try:
            key_id = str(uuid.UUID(key_id))
        except ValueError:
            raise BadRequest("key_id is not a UUID") from None
    client_ip = params.get("client_ip", caller_ip)
    try:
        ipaddress.ip_address(client_ip)
    except ValueError:
        raise BadRequest("client_ip is not an IP address") from None
    return Query(host, path, method, params.get("origin"), key_id, client_ip)


@dataclass(slots=True)
class Report:
    """The §10 JSON, filled step by step; members that do not apply stay None."""

    status: int | None = None
    code: str | None = None
    decided: bool = False  # the answer is known: later steps only report
    members: dict[str, dict[str, Any] | None] = field(
        default_factory=lambda: dict.fromkeys(("tenant", "route", "cors", "key", "limit", "quota"))
    )

    def refuse(self, error: ProxyError) -> None:
        if not self.decided:
            self.status, self.code, self.decided = error.status, error.code, True

    def answer(self, status: int) -> None:
        """The proxy answers it itself (a preflight, a challenge), without a refusal."""
        if not self.decided:
            self.status, self.decided = status, True

    def json(self) -> dict[str, Any]:
        return {"answer": {"status": self.status, "code": self.code}, **self.members}


def _verdict(
    key: ApiKey | None,
    now: datetime,
    client_ip: str,
    request_tenant_id: str | None,
    scope: str | None,
) -> str:
    """The key's own verdict, whatever the tenant's status: "ok" or the code of its refusal."""
    if key is None:
        return InvalidApiKey.code
    try:
        authorize(
            key, now=now, client_ip=client_ip, request_tenant_id=request_tenant_id, scope=scope
        )
    except ProxyError as e:
        return e.code
    return "ok"


def _tenant(tenant: Tenant, rule: str) -> dict[str, Any]:
    return {"id": tenant.id, "slug": tenant.slug, "status": tenant.status, "rule": rule}


class Explainer:
    def __init__(
        self,
        *,
        tenants: TenantStore,
        keys: KeyStore,
        challenges: ChallengeStore,
        buckets: BucketStore,
        quotas: QuotaStore,
        platform_domains: tuple[str, ...],
        ratelimit: RatelimitSettings,
        route_for: Callable[[str], RouteSettings | None],
        clock: Callable[[], datetime],
    ) -> None:
        self._tenants = tenants
        self._keys = keys
        self._challenges = challenges
        self._buckets = buckets
        self._quotas = quotas
        self._platform_domains = platform_domains
        self._ratelimit = ratelimit
        self._route_for = route_for
        self._clock = clock

    async def explain(self, query: Query) -> dict[str, Any]:
        report = Report()
        try:
            await self._steps(query, report)
        except ProxyError as e:  # a refusal that ends the request (no tenant, no route, ...)
            report.refuse(e)
        return report.json()

    async def _steps(self, q: Query, report: Report) -> None:
        now = self._clock()
        if q.method == "CONNECT":
            raise BadRequest("CONNECT is not served")  # as the target stage refuses it
        if challenge_target(q.method, q.path):
            found = await challenge_token(
                self._challenges, self._platform_domains, q.host, q.path, now
            )
            if found is None:
                raise ChallengeNotFound()
            report.answer(200)
            return
        rule = _RULES.get(classify_host(q.host, self._platform_domains).kind, "")
        host_tenant, via_platform = await resolve_tenant(
            self._tenants, q.host, self._platform_domains
        )
        members = report.members
        members["tenant"] = _tenant(host_tenant, rule)
        if q.origin is not None:
            allowed = host_tenant.cors.allows(q.origin)
            preflight = q.method == "OPTIONS"
            members["cors"] = {"origin": q.origin, "allowed": allowed, "preflight": preflight}
            if preflight:  # answered before routing and authentication (CONTRACT §4)
                if not allowed:
                    raise OriginNotAllowed()
                report.answer(204)
                return
        route = self._route_for(q.path)
        if route is None:
            raise NoRoute()
        members["route"] = {"prefix": route.prefix, "upstream": route.upstream, "auth": route.auth}
        tenant, key = await self._access(q, report, route, host_tenant, via_platform, now)
        members["tenant"] = _tenant(tenant, rule)
        if route.meter is not None:
            quota = applicable_quota(q.method, tenant.monthly_render_qty)
            if quota is not None:
                held = await self._quotas.peek(tenant.id, quota, now)
                members["quota"] = {
                    "limit": quota,
                    "remaining": held.left,
                    "reset": seconds_until_next_month(now),
                }
                if not held.admitted:
                    report.refuse(RenderQuotaExceeded())
        if applies_to(route, self._ratelimit):
            ctx = RequestContext(
                request_id="", started=0.0, client_ip=q.client_ip, route=route, tenant=tenant
            )
            ctx.api_key = key
            limit = bucket_of(ctx, self._ratelimit.anonymous_rpm)
            if limit is not None:
                decision = await peek(self._buckets, limit[0], limit[1])
                members["limit"] = {
                    "limit": decision.limit,
                    "remaining": decision.remaining,
                    "reset": decision.reset_s,
                }
                if not decision.allowed and not shadowed(self._ratelimit, tenant):
                    report.refuse(RateLimited())

    async def _access(
        self,
        q: Query,
        report: Report,
        route: RouteSettings,
        host_tenant: Tenant,
        via_platform: bool,
        now: datetime,
    ) -> tuple[Tenant, ApiKey | None]:
        """The access step: the request's tenant and key, the key's own verdict, and the
        step's refusal if any."""
        tenant, key = host_tenant, None
        presented = q.key_id is not None and route.auth != "none"  # "none" reads no key
        request_tenant_id = None if via_platform else host_tenant.id
        scope = required_scope(route.scopes, q.method)
        if presented and q.key_id is not None:
            row = await self._keys.key_by_id(q.key_id)
            if row is not None:
                owner = await key_tenant(self._tenants, row, tenant, via_platform)
                if owner is not None:  # else the key's tenant was deleted: its keys are gone
                    tenant, key = owner, row
            report.members["key"] = {
                "id": q.key_id,
                "verdict": _verdict(key, now, q.client_ip, request_tenant_id, scope),
            }
        try:
            admit(
                tenant,
                route.auth,
                presented=presented,
                key=key,
                now=now,
                client_ip=q.client_ip,
                request_tenant_id=request_tenant_id,
                scope=scope,
            )
        except ProxyError as e:
            report.refuse(e)
        return tenant, key
