"""Standard Webhooks signatures, verified with the `standardwebhooks` library as a reseller's
server would (not with a copy of our own code)."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from proxy.webhooks.signing import signed_headers, signing_key

BODY = b'{"id": "e1", "data": {"render_seconds": 12}, "type": "render.completed"}'
RAW_KEY = bytes(range(32))
WHSEC = "whsec_" + base64.b64encode(RAW_KEY).decode()


def test_whsec_secret_verifies_with_the_library() -> None:
    headers = signed_headers(WHSEC, "msg_1", int(time.time()), BODY)
    assert Webhook(WHSEC).verify(BODY, headers)["type"] == "render.completed"


def test_plain_secret_is_keyed_by_its_utf8_bytes() -> None:
    secret = "pässwörd-not-base64!"
    headers = signed_headers(secret, "msg_2", int(time.time()), BODY)
    Webhook(secret.encode()).verify(BODY, headers)
    # Not as base64: a receiver passing the string to the library would not verify it.
    with pytest.raises(WebhookVerificationError):
        Webhook(base64.b64encode(b"something else").decode()).verify(BODY, headers)


def test_whsec_key_is_the_decoded_bytes_even_unpadded() -> None:
    assert signing_key(WHSEC) == RAW_KEY
    assert signing_key(WHSEC.rstrip("=")) == RAW_KEY


@pytest.mark.parametrize("secret", ["whsec_***", "whsec_"])
def test_whsec_that_is_not_base64_falls_back_to_utf8(secret: str) -> None:
    assert signing_key(secret) == secret.encode()


def test_a_changed_body_or_id_does_not_verify() -> None:
    headers = signed_headers(WHSEC, "msg_3", int(time.time()), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(WHSEC).verify(BODY + b" ", headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(WHSEC).verify(BODY, {**headers, "webhook-id": "msg_4"})


def test_headers() -> None:
    headers = signed_headers(WHSEC, "evt", 1_700_000_000, BODY)
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "FlatRender-Webhooks/1"
    assert headers["webhook-id"] == "evt"
    assert headers["webhook-timestamp"] == "1700000000"
    assert headers["webhook-signature"].startswith("v1,")
