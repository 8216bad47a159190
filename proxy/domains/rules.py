"""What ``domains add`` refuses (CONTRACT §12); pure decisions over already-fetched state.

The domain arrives normalised by ``proxy.core.hosts.normalize_host``, the function the Host
stage uses, so the name stored is exactly the one requests will be matched with.
"""

from __future__ import annotations

import ipaddress

from proxy.core.hosts import is_platform_name


def _is_ip_literal(host: str) -> bool:
    if host.startswith("["):
        return True  # normalize_host keeps IPv6 literals bracketed
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def domain_refusal(domain: str, platform_domains: tuple[str, ...]) -> str | None:
    """Why ``domain`` can never be a custom domain, or None. An IP has no name to prove control
    of (and no certificate an ACME ``ask`` should allow); platform names are reserved (§3)."""
    if _is_ip_literal(domain):
        return f"{domain} is an IP address, not a domain name"
    if is_platform_name(domain, platform_domains):
        return f"{domain} is a platform name (reserved)"
    return None


def add_refusal(
    domain: str,
    *,
    current_domain: str | None,
    current_verified: bool,
    other_tenant: str | None,
    replace: bool,
) -> str | None:
    """Why this tenant may not start verifying ``domain`` now, or None.

    ``current_*`` is the tenant's own custom domain; ``other_tenant`` the slug of a tenant that
    already has ``domain`` as its custom domain.
    """
    if other_tenant is not None:
        return f"{domain} is the custom domain of another tenant"
    if current_verified and current_domain == domain:
        return f"{domain} is already this tenant's verified custom domain"
    if current_verified and current_domain is not None and not replace:
        return (
            f"the tenant's verified custom domain {current_domain} would stop being served; "
            "pass --replace to replace it"
        )
    return None
