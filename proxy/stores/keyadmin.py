"""Key administration for the CLI (CONTRACT §1 ``keys create`` / ``keys revoke``).

Only the prefix, SHA-256 hex and last four characters are stored; the key itself exists in
this process only long enough to be printed once. Revocation reaches running proxies through
the NOTIFY trigger of ``sql/003_edge_invalidation.sql``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from proxy.core.apikeys import PREFIX_LEN, Environment, hash_key, mint_key

TENANT_BY_SLUG = "SELECT id FROM identity.tenants WHERE slug = $1::citext AND deleted_at IS NULL"

INSERT_KEY = """
INSERT INTO identity.tenant_api_keys
       (tenant_id, name, environment, key_prefix, key_hash, last4, scopes, allowed_ips,
        rate_limit_rpm, expires_at)
VALUES ($1, $2, $3::identity.api_key_environment, $4, $5, $6, $7, $8::inet[], $9, $10)
RETURNING id::text
"""

REVOKE_KEY = """
UPDATE identity.tenant_api_keys
   SET revoked_at = coalesce(revoked_at, now()),
       revoked_reason = coalesce($2, revoked_reason),
       is_active = false
 WHERE id = $1::uuid
RETURNING id::text, revoked_at
"""


class KeyAdminError(Exception):
    """A one-line reason the command cannot be carried out."""


@dataclass(frozen=True, slots=True)
class NewKey:
    id: str
    key: str
    key_prefix: str
    last4: str


async def create_key(
    conn: asyncpg.Connection,
    *,
    tenant_slug: str,
    name: str,
    environment: Environment,
    scopes: list[str],
    rpm: int,
    allowed_ips: list[str] | None,
    expires_at: datetime | None,
) -> NewKey:
    tenant_id = await conn.fetchval(TENANT_BY_SLUG, tenant_slug)
    if tenant_id is None:
        raise KeyAdminError(f"--tenant: no tenant with slug {tenant_slug!r}")
    key = mint_key(environment)
    key_id = await conn.fetchval(
        INSERT_KEY,
        tenant_id,
        name,
        "Test" if environment == "test" else "Live",
        key[:PREFIX_LEN],
        hash_key(key),
        key[-4:],
        scopes,
        allowed_ips,
        rpm,
        expires_at,
    )
    return NewKey(id=key_id, key=key, key_prefix=key[:PREFIX_LEN], last4=key[-4:])


async def revoke_key(conn: asyncpg.Connection, key_id: str, reason: str | None) -> datetime:
    row = await conn.fetchrow(REVOKE_KEY, key_id, reason)
    if row is None:
        raise KeyAdminError(f"KEY_ID: no key with id {key_id}")
    revoked_at: datetime = row["revoked_at"]
    return revoked_at
