"""The render quota in embedded mode (no DATABASE_URL, no REDIS_URL): held in process, and each
render started marked on its JSON-lines audit row (CONTRACT §13)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson

from proxy.core.quota import seconds_in_month, seconds_until_next_month
from tests.e2e.test_embedded import _key_row, mint
from tests.procs import Echo, free_port, raw_request, start_proxy, stop, write_config

TENANT = "eeeeeeee-0000-0000-0000-0000000000e1"
HOST = "renders.quota.test"


def test_in_process_quota_and_jsonl_rows(echo: Echo, tmp_path: Path) -> None:
    key = mint()
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(
        f'[[tenants]]\nid = "{TENANT}"\nslug = "quota"\nstatus = "Active"\n'
        f'custom_domain = "{HOST}"\ndomain_verified = true\nmonthly_render_qty = 2\n\n'
        + _key_row("quota-embedded", key, "quota", scopes=["*"], rate_limit_rpm=1000)
        + "\n"
    )
    audit = tmp_path / "audit.jsonl"
    dead = f"http://127.0.0.1:{free_port()}"
    metered = {"auth": "api_key", "audit": True, "meter": "renders"}
    config = write_config(
        tmp_path / "edge.toml",
        tenancy={"embedded_file": str(tenants)},
        upstreams={"render-api": {"urls": [echo.url]}, "dead": {"urls": [dead]}},
        routes=[
            {"prefix": "/v1/renders", "upstream": "render-api", **metered},
            {"prefix": "/v1/dead", "upstream": "dead", **metered},
        ],
    )
    config.write_text(
        config.read_text() + f'\n[audit]\njsonl_path = "{audit}"\nflush_interval_ms = 50\n'
    )
    proxy = start_proxy(config)
    try:

        def post(path: str) -> tuple[int, dict[str, str]]:
            r = raw_request(
                proxy.port,
                f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nX-API-Key: {key}\r\n"
                "Content-Length: 0\r\nConnection: close\r\n\r\n".encode(),
            )
            return r.status, {k.lower(): v for k, v in r.headers}

        assert post("/v1/dead")[0] == 502  # given back
        assert post("/v1/renders/status?code=500")[0] == 500  # given back
        assert post("/v1/renders")[0] == 200
        assert post("/v1/renders")[0] == 200
        status, headers = post("/v1/renders")
        now = datetime.now(UTC)
        assert status == 429
        assert 0 <= int(headers["retry-after"]) - seconds_until_next_month(now) <= 5
        # The key's items first (read without taking a token), then the quota's.
        policy = f'"key";q=1000;w=60, "renders";q=2;w={seconds_in_month(now)}'
        assert headers["ratelimit-policy"] == policy
        assert headers["ratelimit"].split(", ")[1].startswith('"renders";r=0;t=')
        assert headers["x-ratelimit-limit"] == "1000"
    finally:
        stop(proxy.proc)  # SIGTERM writes every pending row
    rows = [orjson.loads(line) for line in audit.read_bytes().splitlines()]
    assert [(r["status_code"], r["render_started"]) for r in rows] == [
        (502, False),
        (500, False),
        (200, True),
        (200, True),
        (429, False),
    ]
    assert rows[-1]["error_message"] == "render_quota_exceeded"
