"""Who may make a request (CONTRACT §3 statuses, §5 keys): the order in which the refusals of
the access step apply, as one pure function of the tenant, the route's ``auth`` mode, the key
presented and what was found for it. The access stage (``pipeline.auth``) and ``/explain``
both ask it, so the two cannot disagree about which refusal comes first.

The tenant's status comes first (a suspended tenant is 403 whatever key is sent), then a
missing or invalid key, then what the key itself may not do (``core.apikeys.authorize``).
"""

from __future__ import annotations

from datetime import datetime

from proxy.core.apikeys import ApiKey, authorize
from proxy.core.tenancy import Tenant, check_status
from proxy.errors import InvalidApiKey, MissingApiKey


def admit(
    tenant: Tenant,
    auth: str,
    *,
    presented: bool,
    key: ApiKey | None,
    now: datetime,
    client_ip: str,
    request_tenant_id: str | None,
    scope: str | None,
) -> None:
    """Raise the contract error of the first refusal that applies.

    ``tenant``: the request's tenant (on a platform domain, the key's once identified);
    ``presented``: a key header was sent; ``key``: the row it matched (None: unknown, wrong or
    malformed); ``request_tenant_id``: the Host's tenant, None on a platform domain where the
    key decides. A route with ``auth = "none"`` reads no key: only the status applies.
    """
    check_status(tenant, now)
    if auth == "none":
        return
    if not presented:
        if auth == "api_key":
            raise MissingApiKey()
        return
    if key is None:
        raise InvalidApiKey()  # unknown, wrong and malformed keys look the same
    authorize(key, now=now, client_ip=client_ip, request_tenant_id=request_tenant_id, scope=scope)
