"""Key administration for the CLI (CONTRACT §1 ``keys create`` | ``revoke``, §5 ``keys rotate``).

Only the prefix, SHA-256 hex and last four characters are stored; the key itself exists in
this process only long enough to be printed once. Revocation reaches running proxies through
the NOTIFY trigger of ``sql/003_edge_invalidation.sql``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

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


KEY_FOR_ROTATION = """
SELECT tenant_id, name, environment::text AS environment, scopes, allowed_ips::text[] AS ips,
       rate_limit_rpm, expires_at, is_active, revoked_at
  FROM identity.tenant_api_keys
 WHERE id = $1::uuid
   FOR UPDATE
"""

# Grace 0 revokes rather than expires: the old key then gets 401 api_key_revoked (CONTRACT §5).
END_ROTATED_KEY = """
UPDATE identity.tenant_api_keys
   SET expires_at = CASE WHEN $2::timestamptz IS NULL THEN expires_at
                         ELSE least(coalesce(expires_at, 'infinity'), $2) END,
       revoked_at = CASE WHEN $2::timestamptz IS NULL THEN $3 ELSE revoked_at END,
       revoked_reason = CASE WHEN $2::timestamptz IS NULL THEN 'rotated' ELSE revoked_reason END,
       is_active = $2::timestamptz IS NOT NULL
 WHERE id = $1::uuid
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
    return await _insert_key(
        conn, tenant_id, name, environment, scopes, rpm, allowed_ips, expires_at
    )


async def _insert_key(
    conn: asyncpg.Connection,
    tenant_id: object,
    name: str,
    environment: Environment,
    scopes: list[str],
    rpm: int,
    allowed_ips: list[str] | None,
    expires_at: datetime | None,
) -> NewKey:
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


async def rotate_key(
    conn: asyncpg.Connection, key_id: str, grace: timedelta, now: datetime
) -> NewKey:
    """Mint a successor with every attribute of ``key_id`` and let the old key live ``grace``
    longer at most (revoke it now when ``grace`` is zero), in one transaction."""
    async with conn.transaction():
        old = await conn.fetchrow(KEY_FOR_ROTATION, key_id)
        if old is None:
            raise KeyAdminError(f"KEY_ID: no key with id {key_id}")
        if old["revoked_at"] is not None or not old["is_active"]:
            raise KeyAdminError(f"KEY_ID: key {key_id} is revoked")
        if old["expires_at"] is not None and old["expires_at"] <= now:
            raise KeyAdminError(f"KEY_ID: key {key_id} has expired")
        new = await _insert_key(
            conn,
            old["tenant_id"],
            old["name"],
            "test" if old["environment"] == "Test" else "live",
            list(old["scopes"]),
            old["rate_limit_rpm"],
            None if old["ips"] is None else list(old["ips"]),
            old["expires_at"],
        )
        await conn.execute(END_ROTATED_KEY, key_id, now + grace if grace else None, now)
    return new


async def revoke_key(conn: asyncpg.Connection, key_id: str, reason: str | None) -> datetime:
    row = await conn.fetchrow(REVOKE_KEY, key_id, reason)
    if row is None:
        raise KeyAdminError(f"KEY_ID: no key with id {key_id}")
    revoked_at: datetime = row["revoked_at"]
    return revoked_at
