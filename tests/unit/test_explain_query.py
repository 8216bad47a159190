"""The query string of ``/explain`` (CONTRACT §10): defaults, normalisation, and what is 400."""

from __future__ import annotations

import pytest

from proxy.errors import BadRequest
from proxy.pipeline.explain import Query, parse_query

KEY_ID = "6F1C1F9E-8A51-4D7E-9A44-2B7C0D9C1A01"


def test_defaults_and_normalisation() -> None:
    q = parse_query(
        {"host": "Acme.FlatRender.test.:8080", "path": "/public/../v1/renders?x=1"}, "::1"
    )
    assert q == Query("acme.flatrender.test", "/v1/renders", "GET", None, None, "::1")
    full = parse_query(
        {
            "host": "acme.flatrender.test",
            "path": "/v1/renders",
            "method": "POST",
            "origin": "https://app.example",
            "key_id": KEY_ID,
            "client_ip": "10.1.2.3",
        },
        "127.0.0.1",
    )
    assert full.key_id == KEY_ID.lower() and full.method == "POST"
    assert (full.origin, full.client_ip) == ("https://app.example", "10.1.2.3")


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"host": "acme.flatrender.test"},
        {"path": "/v1"},
        {"host": "", "path": "/v1"},
        {"host": "acme.flatrender.test", "path": ""},
        {"host": "a b", "path": "/v1"},
        {"host": "acme.flatrender.test", "path": "v1"},
        {"host": "acme.flatrender.test", "path": "/.."},
        {"host": "acme.flatrender.test", "path": "/v1", "key_id": "fr_live_abc"},
        {"host": "acme.flatrender.test", "path": "/v1", "key_id": ""},
        {"host": "acme.flatrender.test", "path": "/v1", "method": "GE T"},
        {"host": "acme.flatrender.test", "path": "/v1", "client_ip": "somewhere"},
    ],
)
def test_malformed_queries_are_bad_requests(params: dict[str, str]) -> None:
    with pytest.raises(BadRequest):
        parse_query(params, "127.0.0.1")
