"""Postgres for custom-domain verification: the ``domains add`` transaction, claiming the rows
that are due, and recording each check (CONTRACT §12).

One connection is used throughout: the verifier's (which also holds its advisory lock) or the
command's. Times come from the caller's clock, so every process computes the schedule alike.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from proxy.core.check_schedule import next_check_at
from proxy.domains.challenge import Method
from proxy.domains.rules import add_refusal

TENANT_FOR_UPDATE = """
SELECT id::text AS id, custom_domain::text AS custom_domain, domain_verified
  FROM identity.tenants
 WHERE slug = $1::citext AND deleted_at IS NULL
   FOR UPDATE
"""
# Deleted tenants included: tenants.custom_domain is UNIQUE over every row.
DOMAIN_OWNER = """
SELECT slug::text FROM identity.tenants WHERE custom_domain = $1::citext AND id <> $2::uuid
"""
SET_TENANT_DOMAIN = """
UPDATE identity.tenants SET custom_domain = $2::citext, domain_verified = false
 WHERE id = $1::uuid
"""
# The tenant's pending challenges for the domains it no longer wants: no longer checked, no
# longer answered on the challenge path (§3), from the moment the new domain is set.
EXPIRE_OTHER_CHALLENGES = """
UPDATE identity.tenant_domain_verifications SET expires_at = now()
 WHERE tenant_id = $1::uuid AND domain <> $2::citext AND NOT verified AND expires_at > now()
"""
INSERT_VERIFICATION = """
INSERT INTO identity.tenant_domain_verifications
       (tenant_id, domain, method, challenge_token, expires_at)
VALUES ($1::uuid, $2::citext, $3, $4, $5)
RETURNING id::text
"""

# $1 now, $2 the lease's end, $3 one domain (then its rows whatever their schedule) or NULL,
# $4 how many rows at most. A row another checker claimed meanwhile fails the ON CONFLICT
# condition and is not returned (the INSERT waits for that checker's claim to commit first).
CLAIM_DUE = """
WITH due AS (
    SELECT v.id
      FROM identity.tenant_domain_verifications v
      LEFT JOIN identity.edge_domain_checks c ON c.verification_id = v.id
     WHERE NOT v.verified AND v.expires_at > $1
       AND CASE WHEN $3::citext IS NULL
                THEN c.next_check_at IS NULL OR c.next_check_at <= $1
                ELSE v.domain = $3::citext END
     ORDER BY c.next_check_at NULLS FIRST
     LIMIT $4
), claimed AS (
    INSERT INTO identity.edge_domain_checks AS c (verification_id, next_check_at)
    SELECT id, $2 FROM due
    ON CONFLICT (verification_id) DO UPDATE SET next_check_at = $2
     WHERE $3::citext IS NOT NULL OR c.next_check_at <= $1
    RETURNING c.verification_id
)
SELECT v.id::text AS id, v.tenant_id::text AS tenant_id, v.domain::text AS domain, v.method,
       v.challenge_token
  FROM claimed JOIN identity.tenant_domain_verifications v ON v.id = claimed.verification_id
"""
COUNT_CHECK = """
UPDATE identity.edge_domain_checks SET checks = checks + 1
 WHERE verification_id = $1::uuid
RETURNING checks
"""
SCHEDULE_NEXT = """
UPDATE identity.edge_domain_checks SET next_check_at = $2 WHERE verification_id = $1::uuid
"""
RECORD_CHECK = """
UPDATE identity.tenant_domain_verifications
   SET last_checked_at = $2,
       verified_at = CASE WHEN $3 AND NOT verified THEN $2 ELSE verified_at END,
       verified = verified OR $3
 WHERE id = $1::uuid
"""
# Only while the tenant still wants this domain: a `domains add` of another one since then wins.
VERIFY_TENANT = """
UPDATE identity.tenants SET domain_verified = true
 WHERE id = $1::uuid AND custom_domain = $2::citext AND NOT domain_verified
"""


class DomainRefused(Exception):
    """A one-line reason ``domains add`` changed nothing."""


@dataclass(frozen=True, slots=True)
class AddedChallenge:
    id: str
    domain: str
    method: Method
    token: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class DueCheck:
    id: str
    tenant_id: str
    domain: str
    method: str  # as stored: HTTP_FILE or DNS_TXT (anything else fails its check)
    token: str


class DomainStore:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        # The verifier's checks record concurrently with its claims; a connection runs one
        # statement (or transaction) at a time.
        self._turn = asyncio.Lock()

    async def add(
        self,
        *,
        tenant_slug: str,
        domain: str,
        method: Method,
        token: str,
        expires_at: datetime,
        replace: bool,
    ) -> AddedChallenge:
        """Point the tenant at ``domain`` (unverified) and open a challenge, in one transaction;
        ``DomainRefused`` with nothing changed when the rules say no."""
        conn = self._conn
        async with self._turn, conn.transaction():
            tenant = await conn.fetchrow(TENANT_FOR_UPDATE, tenant_slug)
            if tenant is None:
                raise DomainRefused(f"--tenant: no tenant with slug {tenant_slug!r}")
            current = tenant["custom_domain"]
            refusal = add_refusal(
                domain,
                current_domain=current.lower() if current else None,
                current_verified=tenant["domain_verified"],
                other_tenant=await conn.fetchval(DOMAIN_OWNER, domain, tenant["id"]),
                replace=replace,
            )
            if refusal is not None:
                raise DomainRefused(f"--domain: {refusal}")
            try:
                await conn.execute(SET_TENANT_DOMAIN, tenant["id"], domain)
            except asyncpg.UniqueViolationError:
                # Another tenant took it between our check and this update.
                raise DomainRefused(
                    f"--domain: {domain} is the custom domain of another tenant"
                ) from None
            await conn.execute(EXPIRE_OTHER_CHALLENGES, tenant["id"], domain)
            row_id = await conn.fetchval(
                INSERT_VERIFICATION, tenant["id"], domain, method, token, expires_at
            )
        return AddedChallenge(row_id, domain, method, token, expires_at)

    async def claim_due(
        self, now: datetime, lease_until: datetime, domain: str | None, limit: int
    ) -> list[DueCheck]:
        """The unverified, unexpired rows that are due (or every one of ``domain``'s), each
        leased to the caller until ``lease_until``."""
        async with self._turn:
            rows = await self._conn.fetch(CLAIM_DUE, now, lease_until, domain, limit)
        return [
            DueCheck(
                r["id"], r["tenant_id"], r["domain"].lower(), r["method"], r["challenge_token"]
            )
            for r in rows
        ]

    async def record(self, check: DueCheck, verified: bool, at: datetime) -> None:
        """One check made at ``at``: count it, schedule the next, and on a pass verify the row
        and the tenant, all in one transaction (the tenant's NOTIFY then reaches every proxy)."""
        conn = self._conn
        async with self._turn, conn.transaction():
            checks = await conn.fetchval(COUNT_CHECK, check.id)
            if checks is not None:
                await conn.execute(SCHEDULE_NEXT, check.id, next_check_at(at, checks))
            await conn.execute(RECORD_CHECK, check.id, at, verified)
            if verified:
                await conn.execute(VERIFY_TENANT, check.tenant_id, check.domain)
