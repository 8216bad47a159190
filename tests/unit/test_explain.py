"""``pipeline.explain.Explainer`` over the in-memory stores: the paths the e2e table (which holds
answers against a real proxy) does not reach — challenges, CONNECT, shadow mode, the per-IP
bucket of anonymous requests, a quota of 0, a key whose tenant is gone — and that it takes
nothing from the stores it peeks at."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from proxy.core.apikeys import ApiKey
from proxy.core.routes import RouteTable
from proxy.core.tenancy import DEFAULT_TENANT_ID, Tenant
from proxy.pipeline.explain import Explainer, Query
from proxy.settings import RatelimitSettings, RouteSettings
from proxy.stores.buckets import MemoryBucketStore
from proxy.stores.memory import MemoryKeyStore, MemoryTenantStore
from proxy.stores.quota import MemoryQuotaStore

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
APEX = "flatrender.test"
ACME = Tenant(
    id="t-acme",
    slug="acme",
    status="Active",
    custom_domain="videos.acme.test",
    domain_verified=True,
    monthly_render_qty=0,
)
SHADOW = Tenant(id="t-shadow", slug="shadow", status="Active", features={"ratelimit_shadow": True})
DEFAULT = Tenant(id=DEFAULT_TENANT_ID, slug="flatrender", status="Active")
KEY = "0d8f6a4e-0000-4000-8000-000000000001"
ORPHAN = "0d8f6a4e-0000-4000-8000-000000000002"  # its tenant is gone
SHADOW_KEY = "0d8f6a4e-0000-4000-8000-000000000003"


def _key(key_id: str, tenant_id: str, rpm: int = 2) -> ApiKey:
    return ApiKey(key_id, tenant_id, "live", "fr_live_abcd", "0" * 64, ("*",), rate_limit_rpm=rpm)


ROUTES = RouteTable(
    [
        RouteSettings("/v1/renders", "api", auth="api_key", meter="renders"),
        RouteSettings("/public", "api", auth="none"),
        RouteSettings("/opt", "api", auth="optional"),
    ]
)


def explainer(
    buckets: MemoryBucketStore,
    quotas: MemoryQuotaStore,
    ratelimit: RatelimitSettings | None = None,
) -> Explainer:
    tenants = MemoryTenantStore(
        [ACME, SHADOW, DEFAULT],
        challenges=[("videos.acme.test", "tok", NOW + timedelta(days=1))],
    )
    keys = MemoryKeyStore(
        [_key(KEY, ACME.id), _key(ORPHAN, "t-gone"), _key(SHADOW_KEY, SHADOW.id, rpm=1)]
    )
    return Explainer(
        tenants=tenants,
        keys=keys,
        challenges=tenants,
        buckets=buckets,
        quotas=quotas,
        platform_domains=(APEX,),
        ratelimit=ratelimit or RatelimitSettings(anonymous_rpm=1),
        route_for=ROUTES.match,
        clock=lambda: NOW,
    )


def q(host: str, path: str, method: str = "GET", key_id: str | None = None) -> Query:
    return Query(host, path, method, None, key_id, "192.0.2.7")


def answer(report: dict[str, Any]) -> tuple[int | None, str | None]:
    return report["answer"]["status"], report["answer"]["code"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (q("videos.acme.test", "/.well-known/flatrender-challenge/tok"), (200, None)),
        (
            q("videos.acme.test", "/.well-known/flatrender-challenge/nope"),
            (404, "challenge_not_found"),
        ),
        (
            q("acme.flatrender.test", "/.well-known/flatrender-challenge/tok"),
            (404, "challenge_not_found"),
        ),
        (q("acme.flatrender.test", "/public", method="CONNECT"), (400, "bad_request")),
        (q("a.b.flatrender.test", "/public"), (404, "unknown_host")),  # reserved: no tenant
        (
            q("videos.acme.test", "/v1/renders", method="POST", key_id=KEY),
            (429, "render_quota_exceeded"),
        ),
        (q("videos.acme.test", "/v1/renders", key_id=KEY), (None, None)),  # a GET: no quota
        (q(APEX, "/v1/renders", key_id=ORPHAN), (401, "invalid_api_key")),
        (q("videos.acme.test", "/opt"), (None, None)),
    ],
)
async def test_answers(query: Query, expected: tuple[int | None, str | None]) -> None:
    assert (
        answer(await explainer(MemoryBucketStore(), MemoryQuotaStore()).explain(query)) == expected
    )


async def test_an_empty_bucket_refuses_unless_shadowed() -> None:
    buckets = MemoryBucketStore(clock=lambda: 0.0)
    explain = explainer(buckets, MemoryQuotaStore())
    await buckets.take(f"key:{KEY}", 2)
    await buckets.take(f"key:{KEY}", 2)
    await buckets.take(f"key:{SHADOW_KEY}", 1)
    limited = await explain.explain(q("videos.acme.test", "/v1/renders", key_id=KEY))
    assert answer(limited) == (429, "rate_limited")
    assert limited["limit"] == {"limit": 2, "remaining": 0, "reset": 60}
    shadowed = await explain.explain(q("shadow.flatrender.test", "/v1/renders", key_id=SHADOW_KEY))
    assert answer(shadowed) == (None, None) and shadowed["limit"]["remaining"] == 0


async def test_anonymous_requests_peek_at_the_client_ips_bucket() -> None:
    buckets = MemoryBucketStore(clock=lambda: 0.0)
    explain = explainer(buckets, MemoryQuotaStore())
    report = await explain.explain(q("videos.acme.test", "/public"))
    assert report["limit"] == {"limit": 1, "remaining": 1, "reset": 0} and report["key"] is None
    await buckets.take(f"ip:{ACME.id}:192.0.2.7", 1)
    assert answer(await explain.explain(q("videos.acme.test", "/public"))) == (429, "rate_limited")


async def test_explaining_takes_no_token_and_no_unit() -> None:
    buckets = MemoryBucketStore(clock=lambda: 0.0)
    quotas = MemoryQuotaStore()
    explain = explainer(buckets, quotas)
    for _ in range(5):
        report = await explain.explain(q("videos.acme.test", "/v1/renders", key_id=KEY))
        assert report["limit"]["remaining"] == 2
        await explain.explain(q("videos.acme.test", "/v1/renders", method="POST", key_id=KEY))
    assert quotas.counters.admitted == quotas.counters.refused == quotas.counters.rebuilds == 0
    assert (await buckets.take(f"key:{KEY}", 2)).remaining == 1  # the bucket was still full
