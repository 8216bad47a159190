"""Standard Webhooks signatures (https://www.standardwebhooks.com, "Signature scheme").

``webhook-signature: v1,<base64 HMAC-SHA256 over "<webhook-id>.<webhook-timestamp>.<body>">``.
A secret written ``whsec_<base64>`` is keyed by the decoded bytes, as every Standard Webhooks
library decodes it; any other secret by its UTF-8 bytes (a reseller verifies it by passing
those bytes to the library). A ``whsec_`` secret whose remainder is not base64, or decodes to
nothing, is used as UTF-8 bytes too: the libraries could not load it either, and an unsigned
or unsent request would help nobody.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

SECRET_PREFIX = "whsec_"


def signing_key(secret: str) -> bytes:
    if secret.startswith(SECRET_PREFIX):
        try:
            # Unpadded base64 is common; extra padding is ignored (the libraries do the same).
            key = base64.b64decode(secret[len(SECRET_PREFIX) :] + "==")
        except (binascii.Error, ValueError):
            key = b""
        if key:
            return key
    return secret.encode()


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The request headers of one attempt (CONTRACT §11)."""
    return {
        "Content-Type": "application/json",
        "User-Agent": "FlatRender-Webhooks/1",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(signing_key(secret), msg_id, timestamp, body),
    }
