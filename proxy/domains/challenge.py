"""What a challenge looks like (CONTRACT §12): its token, where each method expects it, and the
instructions ``domains add`` prints for a reseller."""

from __future__ import annotations

import secrets
from typing import Literal

from proxy.pipeline.routing import CHALLENGE_PREFIX

Method = Literal["HTTP_FILE", "DNS_TXT"]
# The label under which DNS_TXT expects the token, as ACME's "_acme-challenge" (RFC 8555 §8.4).
TXT_LABEL = "_flatrender-challenge"


def new_token() -> str:
    """32 random bytes (256 bits, as ACME tokens have at least 128, RFC 8555 §8.1) in the URL-safe
    base64 alphabet: 43 characters, usable as a path segment and a TXT value alike."""
    return secrets.token_urlsafe(32)


def txt_name(domain: str) -> str:
    return f"{TXT_LABEL}.{domain}"


def challenge_path(token: str) -> str:
    return f"{CHALLENGE_PREFIX}{token}"


def instructions(domain: str, method: Method, token: str) -> dict[str, str]:
    """What the reseller must do for the verifier to pass this challenge."""
    if method == "DNS_TXT":
        return {
            "record_name": txt_name(domain),
            "record_type": "TXT",
            "record_value": token,
            "text": (
                f"Create a TXT record named {txt_name(domain)} with the value {token}. "
                "The edge checks it within seconds, then with a growing interval (at most hourly)."
            ),
        }
    url = f"http://{domain}{challenge_path(token)}"
    return {
        "url": url,
        "expected_body": token,
        "text": (
            f"Point {domain} at the edge (a CNAME or A record); the edge itself then answers "
            f"{url} with the token, and the check passes. No file needs to be uploaded."
        ),
    }
