"""Rate limiting in real Redis through real proxy processes (CONTRACT §6)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from proxy.core.bucket import BucketState, peek, take
from proxy.stores.redis import BATCH_SCRIPT, bucket_key
from tests.e2e.test_embedded import _key_row, mint
from tests.procs import Echo, Proxy, raw_request, start_proxy, stop, write_config
from tests.servers import RedisClusterServer, RedisSentinelSet, RedisServer

HOST = "videos.acme.test"
ACME = "dddddddd-0000-0000-0000-000000000001"


def key_id(name: str) -> str:
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_DNS, name))


def tenants_file(path: Path, keys: dict[str, tuple[str, int]], shadow: bool = False) -> Path:
    rows = [
        _key_row(name, key, "acme", scopes=["*"], rate_limit_rpm=rpm)
        for name, (key, rpm) in keys.items()
    ]
    features = "features = { ratelimit_shadow = true }\n" if shadow else ""
    path.write_text(
        f'[[tenants]]\nid = "{ACME}"\nslug = "acme"\nstatus = "Active"\n'
        f'custom_domain = "{HOST}"\ndomain_verified = true\n{features}\n' + "\n\n".join(rows) + "\n"
    )
    return path


def config(tmp: Path, echo: Echo, tenants: Path, **ratelimit: object) -> Path:
    path = write_config(
        tmp / "edge.toml",
        tenancy={"embedded_file": str(tenants)},
        upstreams={"render-api": {"urls": [echo.url]}},
        routes=[
            {"prefix": "/v1", "upstream": "render-api", "auth": "api_key"},
            {"prefix": "/public", "upstream": "render-api", "auth": "none"},
        ],
    )
    lines = "\n".join(
        f"{k} = {v!r}".replace("'", '"').replace("True", "true").replace("False", "false")
        for k, v in ratelimit.items()
    )
    path.write_text(path.read_text() + f"\n[ratelimit]\n{lines}\n")
    return path


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


def sentinel_env(sentinel: RedisSentinelSet) -> dict[str, str]:
    return {
        "REDIS_URL": sentinel.sentinel_url,
        "REDIS_MODE": "sentinel",
        "REDIS_SENTINEL_SERVICE": sentinel.service,
    }


async def burst(
    http: aiohttp.ClientSession, proxies: list[Proxy], key: str, n: int, path: str = "/v1/x"
) -> list[int]:
    async def one(i: int) -> int:
        proxy = proxies[i % len(proxies)]
        async with http.get(f"{proxy.url}{path}", headers={"Host": HOST, "X-API-Key": key}) as r:
            await r.read()
            return r.status

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_lua_script_and_pure_function_agree(redis_server: RedisServer) -> None:
    """One table of (time, capacity) steps through core.bucket.take and the Lua script."""
    client = aioredis.Redis.from_url(redis_server.url)
    script = client.register_script(BATCH_SCRIPT)
    steps = [
        (0.0, 3),
        (0.0, 3),
        (0.0, 3),
        (0.0, 3),
        (10.0, 3),
        (19.9, 3),
        (20.0, 3),
        (20.0, 3),
        (100.0, 3),
        (100.0, 6),
        (50.0, 6),
        (50.0, 1),
        (400.0, 1),
        (400.0, 1),
    ]
    key = bucket_key(f"table:{time.monotonic_ns()}")
    state: BucketState | None = None
    try:
        for now, capacity in steps:
            state, expected = take(state, capacity, 1_700_000_000.0 + now)
            reply = await script(keys=[key], args=[capacity, 1_700_000_000.0 + now])
            assert (reply[0] == 1) == expected.allowed, (now, capacity)
            assert float(reply[1]) == pytest.approx(state.tokens), (now, capacity)
        # One batch holding several checks of the same buckets, interleaved: applied in order,
        # at one "now", exactly as repeated calls of the pure function.
        a, b = (
            bucket_key(f"batch-a:{time.monotonic_ns()}"),
            bucket_key(f"batch-b:{time.monotonic_ns()}"),
        )
        keys, caps = [a, b, a, a, b, a, a], [3, 2, 3, 3, 2, 3, 3]
        reply = await script(keys=keys, args=[*caps, 1_700_000_500.0])
        states: dict[str, BucketState | None] = {a: None, b: None}
        for i, (k, cap) in enumerate(zip(keys, caps, strict=True)):
            states[k], expected = take(states[k], cap, 1_700_000_500.0)
            assert (reply[2 * i] == 1) == expected.allowed, i
            assert float(reply[2 * i + 1]) == pytest.approx(states[k].tokens), i  # type: ignore[union-attr]
    finally:
        await client.aclose()


async def test_a_peek_writes_nothing(redis_server: RedisServer) -> None:
    """A peek (negative capacity) reports what ``core.bucket.peek`` reports and leaves Redis as
    it was: an absent bucket stays absent, a stored one keeps its value and its expiry; in a
    batch where the same bucket is also taken from, only the take writes."""
    client = aioredis.Redis.from_url(redis_server.url)
    script = client.register_script(BATCH_SCRIPT)
    t0 = 1_700_000_000.0
    absent, stored = (bucket_key(f"peek-{n}:{time.monotonic_ns()}") for n in ("a", "s"))
    try:
        reply = await script(keys=[absent], args=[-3, t0])
        assert reply[0] == 1 and float(reply[1]) == 3.0
        assert await client.exists(absent) == 0
        await script(keys=[stored, stored], args=[3, 3, t0])  # two tokens taken
        before = (await client.get(stored), await client.pttl(stored))
        reply = await script(keys=[stored], args=[-3, t0 + 10])
        state, _ = take(take(None, 3, t0)[0], 3, t0)
        expected = peek(state, 3, t0 + 10)
        assert (reply[0] == 1, int(float(reply[1]))) == (expected.allowed, expected.remaining)
        assert await client.get(stored) == before[0]
        assert await client.pttl(stored) <= before[1]  # not pushed back by a write
        await script(keys=[stored, stored], args=[-3, 3, t0 + 10])  # peek, then take
        assert await client.get(stored) != before[0]
    finally:
        await client.aclose()


async def test_burst_is_exact_in_one_and_across_two_processes(
    echo: Echo, redis_server: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    one, two = mint(), mint()
    tenants = tenants_file(tmp_path / "t.toml", {"one": (one, 60), "two": (two, 60)})
    env = {"REDIS_URL": redis_server.url}
    a = start_proxy(config(tmp_path, echo, tenants), env=env)
    b = start_proxy(config(tmp_path, echo, tenants), env=env)
    try:
        assert (await burst(http, [a], one, 200)).count(200) == 60
        assert (await burst(http, [a, b], two, 200)).count(200) == 60
        emptied = time.monotonic()
        await asyncio.sleep(2.0 - (time.monotonic() - emptied) + 0.1)  # the 2 s of the contract
        assert (await burst(http, [a, b], two, 20)).count(200) == 2
    finally:
        stop(a.proc)
        stop(b.proc)


async def test_rejections_take_nothing_and_headers_follow_the_contract(
    echo: Echo, redis_server: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    key = mint()
    proxy = start_proxy(
        config(tmp_path, echo, tenants_file(tmp_path / "t.toml", {"k": (key, 60)})),
        env={"REDIS_URL": redis_server.url},
    )
    try:
        statuses = await burst(http, [proxy], key, 60)
        assert statuses.count(200) == 60
        emptied = time.monotonic()
        first_grant = None
        while first_grant is None:  # keep knocking; each refusal must take nothing
            async with http.get(f"{proxy.url}/v1/x", headers={"Host": HOST, "X-API-Key": key}) as r:
                await r.read()
                if r.status == 200:
                    first_grant = time.monotonic() - emptied
                else:
                    assert r.status == 429
                    assert int(r.headers["Retry-After"]) >= 1
                    assert r.headers["X-RateLimit-Remaining"] == "0"
                    assert r.headers["RateLimit-Policy"] == '"key";q=60;w=60'
            assert time.monotonic() - emptied < 3, "refusals delayed the next grant"
            await asyncio.sleep(0.05)
        assert first_grant < 1.3  # one token a second at rpm = 60
        async with aioredis.Redis.from_url(redis_server.url) as client:
            assert await client.exists(bucket_key(f"key:{key_id('k')}"))
    finally:
        stop(proxy.proc)


async def test_fewer_redis_commands_than_requests_under_load(
    echo: Echo, own_redis: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    keys = {f"k{i}": (mint(), 1_000_000) for i in range(5)}
    keys["hot"] = (mint(), 30)  # driven far over its limit: the local short-cut answers
    proxy = start_proxy(
        config(tmp_path, echo, tenants_file(tmp_path / "t.toml", keys)),
        env={"REDIS_URL": own_redis.url},
    )
    try:
        async with aioredis.Redis.from_url(own_redis.url) as client:
            await client.config_resetstat()
            sem = asyncio.Semaphore(64)
            names = [f"k{i % 5}" if i % 4 else "hot" for i in range(2000)]

            async def one(name: str) -> int:
                async with (
                    sem,
                    http.get(
                        f"{proxy.url}/v1/x", headers={"Host": HOST, "X-API-Key": keys[name][0]}
                    ) as r,
                ):
                    await r.read()
                    return r.status

            started = time.monotonic()
            statuses = await asyncio.gather(*(one(n) for n in names))
            elapsed = time.monotonic() - started
            stats = await client.info("commandstats")
        # The hot key's 30 tokens, plus what refilled (30/60 a second) while the burst ran: on a
        # loaded machine the burst can take long enough for a token or two to come back.
        refilled = int(elapsed * 30 / 60) + 1
        granted = names.count("hot") - statuses.count(429)
        assert 30 <= granted <= 30 + refilled
        assert statuses.count(200) + statuses.count(429) == len(names)
        calls = sum(
            v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")
        )
        assert 0 < calls < len(names)  # below one command per request
    finally:
        stop(proxy.proc)


async def _latencies(
    http: aiohttp.ClientSession, proxy: Proxy, key: str, n: int
) -> list[tuple[int, float]]:
    out = []
    for _ in range(n):
        started = time.monotonic()
        async with http.get(f"{proxy.url}/v1/x", headers={"Host": HOST, "X-API-Key": key}) as r:
            await r.read()
            out.append((r.status, time.monotonic() - started))
    return out


async def test_redis_killed_fail_open_keeps_serving_fast_and_recovers(
    echo: Echo, own_redis: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    key, fresh = mint(), mint()
    tenants = tenants_file(tmp_path / "t.toml", {"k": (key, 100_000), "fresh": (fresh, 5)})
    proxy = start_proxy(
        config(tmp_path, echo, tenants, failure_mode="open"), env={"REDIS_URL": own_redis.url}
    )
    try:
        assert all(s == 200 for s, _ in await _latencies(http, proxy, key, 20))
        load = asyncio.ensure_future(_latencies(http, proxy, key, 300))
        await asyncio.sleep(0.2)  # mid-load
        own_redis.kill()
        results = await load
        assert all(s == 200 for s, _ in results)
        assert max(t for _, t in results) < 0.1, "a request waited on the dead limiter"
        own_redis.start()
        started = time.monotonic()
        async with aioredis.Redis.from_url(own_redis.url) as client:
            # Exact limiting is back when the decisions land in Redis again.
            while not await client.exists(bucket_key(f"key:{key_id('k')}")):
                await _latencies(http, proxy, key, 1)
                assert time.monotonic() - started < 2.0, "did not resume within 2 s"
                await asyncio.sleep(0.05)
        assert (await burst(http, [proxy], fresh, 20)).count(200) == 5
    finally:
        output = proxy.output()
    assert "Traceback" not in output


async def test_redis_killed_fail_closed_answers_503_and_recovers(
    echo: Echo, own_redis: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    key = mint()
    tenants = tenants_file(tmp_path / "t.toml", {"k": (key, 100_000)})
    proxy = start_proxy(
        config(tmp_path, echo, tenants, failure_mode="closed"), env={"REDIS_URL": own_redis.url}
    )
    try:
        assert (await _latencies(http, proxy, key, 1))[0][0] == 200
        own_redis.kill()
        async with http.get(f"{proxy.url}/v1/x", headers={"Host": HOST, "X-API-Key": key}) as r:
            assert r.status == 503 and r.content_type == "application/json"
            assert (await r.json())["error"]["code"] == "rate_limiter_unavailable"
        async with http.get(f"http://127.0.0.1:{proxy.admin_port}/readyz") as r:
            assert r.status == 503
        # Open routes without a key do not need the limiter.
        async with http.get(f"{proxy.url}/public/x", headers={"Host": HOST}) as r:
            assert r.status == 200
        own_redis.start()
        started = time.monotonic()
        while (await _latencies(http, proxy, key, 1))[0][0] != 200:
            assert time.monotonic() - started < 2.0, "did not recover within 2 s"
            await asyncio.sleep(0.05)
    finally:
        output = proxy.output()
    assert "Traceback" not in output


async def test_black_holed_redis_costs_one_deadline(
    echo: Echo, own_redis: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    key = mint()
    tenants = tenants_file(tmp_path / "t.toml", {"k": (key, 100_000)})
    proxy = start_proxy(
        config(tmp_path, echo, tenants, failure_mode="open"), env={"REDIS_URL": own_redis.url}
    )
    try:
        assert (await _latencies(http, proxy, key, 1))[0][0] == 200
        own_redis.pause()  # accepts, never answers
        try:
            results = await _latencies(http, proxy, key, 30)
        finally:
            own_redis.resume()
        assert all(s == 200 for s, _ in results)
        slow = [t for _, t in results if t >= 0.1]
        assert len(slow) <= 1, slow  # the one call that found out, then the breaker is open
    finally:
        stop(proxy.proc)


async def test_shadow_mode_reports_but_never_rejects(
    echo: Echo, redis_server: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    key, tenant_key = mint(), mint()
    global_shadow = start_proxy(
        config(tmp_path, echo, tenants_file(tmp_path / "a.toml", {"k": (key, 3)}), shadow=True),
        env={"REDIS_URL": redis_server.url},
    )
    per_tenant = start_proxy(
        config(
            tmp_path, echo, tenants_file(tmp_path / "b.toml", {"t": (tenant_key, 3)}, shadow=True)
        ),
        env={"REDIS_URL": redis_server.url},
    )
    try:
        for proxy, k in ((global_shadow, key), (per_tenant, tenant_key)):
            statuses = await burst(http, [proxy], k, 6)
            assert statuses == [200] * 6
            async with http.get(f"{proxy.url}/v1/x", headers={"Host": HOST, "X-API-Key": k}) as r:
                assert r.status == 200 and r.headers["X-RateLimit-Remaining"] == "0"
    finally:
        stop(global_shadow.proc)
        stop(per_tenant.proc)


async def test_anonymous_traffic_has_a_bucket_per_ip(
    echo: Echo, redis_server: RedisServer, tmp_path: Path
) -> None:
    tenants = tenants_file(tmp_path / "t.toml", {})
    proxy = start_proxy(
        config(tmp_path, echo, tenants, anonymous_rpm=3), env={"REDIS_URL": redis_server.url}
    )
    try:

        def get(source: str) -> int:
            req = f"GET /public/x HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
            r = raw_request(proxy.port, req.encode(), source=source)
            if r.status == 200:
                assert r.header("RateLimit-Policy") == '"ip";q=3;w=60'
            return r.status

        assert [get("127.0.0.3") for _ in range(4)] == [200, 200, 200, 429]
        assert get("127.0.0.4") == 200  # another client, another bucket
    finally:
        stop(proxy.proc)


async def test_burst_is_exact_on_a_three_master_cluster(
    echo: Echo, redis_cluster: RedisClusterServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    keys = {f"c{i}": (mint(), 60) for i in range(3)}
    tenants = tenants_file(tmp_path / "t.toml", keys)
    env = {"REDIS_URL": redis_cluster.url, "REDIS_MODE": "cluster"}
    a = start_proxy(config(tmp_path, echo, tenants), env=env)
    b = start_proxy(config(tmp_path, echo, tenants), env=env)
    try:
        for name, (key, _) in keys.items():
            proxies = [a, b] if name != "c0" else [a]
            assert (await burst(http, proxies, key, 200)).count(200) == 60, name
        # The buckets are spread over the masters by their hash tags.
        owners = {redis_cluster.node_for_slot(_slot(bucket_key(f"key:{key_id(n)}"))) for n in keys}
        assert len(owners) >= 2
    finally:
        stop(a.proc)
        stop(b.proc)


def _slot(key: str) -> int:
    from redis.crc import key_slot

    return int(key_slot(key.encode()))


async def test_burst_is_exact_through_sentinel(
    echo: Echo, redis_sentinel: RedisSentinelSet, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    key = mint()
    tenants = tenants_file(tmp_path / "t.toml", {"s": (key, 60)})
    env = sentinel_env(redis_sentinel)
    a = start_proxy(config(tmp_path, echo, tenants), env=env)
    b = start_proxy(config(tmp_path, echo, tenants), env=env)
    try:
        assert (await burst(http, [a, b], key, 200)).count(200) == 60
        master = aioredis.Redis(host="127.0.0.1", port=redis_sentinel.master_port)
        try:
            assert await master.exists(bucket_key(f"key:{key_id('s')}"))
        finally:
            await master.aclose()
    finally:
        stop(a.proc)
        stop(b.proc)


async def test_limiter_follows_a_sentinel_failover_by_itself(
    echo: Echo, redis_sentinel: RedisSentinelSet, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Fail-closed, so every answer says whether the limiter reached a master: 200 before, 503
    while there is none, then 200 again, written to the promoted replica."""
    await redis_sentinel.astart()
    key = mint()
    tenants = tenants_file(tmp_path / "t.toml", {"f": (key, 100_000)})
    env = sentinel_env(redis_sentinel)
    proxy = start_proxy(config(tmp_path, echo, tenants, failure_mode="closed"), env=env)
    try:
        assert await burst(http, [proxy], key, 5) == [200] * 5
        await redis_sentinel.akill_master()
        promoted = await redis_sentinel.await_failover()
        deadline = time.monotonic() + 10
        statuses: list[int] = []
        while not statuses or statuses[-1] != 200:
            assert time.monotonic() < deadline, statuses[-10:]
            statuses += await burst(http, [proxy], key, 1)
            await asyncio.sleep(0.05)
        assert set(statuses) <= {200, 503}
        master = aioredis.Redis(host=promoted[0], port=promoted[1])
        try:
            assert await master.exists(bucket_key(f"key:{key_id('f')}"))
            assert (await master.info("replication"))["role"] == "master"
        finally:
            await master.aclose()
    finally:
        stop(proxy.proc)
        await redis_sentinel.aheal()


async def test_fail_open_buckets_hold_rpm_over_expected_instances(
    echo: Echo, own_redis: RedisServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """With Redis gone, each process answers from a bucket of rpm / expected_instances, so N
    proxies together stay near the configured limit (CONTRACT §6, failure_mode = "open")."""
    key = mint()
    tenants = tenants_file(tmp_path / "t.toml", {"k": (key, 10)})
    proxy = start_proxy(
        config(tmp_path, echo, tenants, failure_mode="open", expected_instances=2),
        env={"REDIS_URL": own_redis.url},
    )
    try:
        own_redis.kill()
        statuses = await burst(http, [proxy], key, 12)
        assert statuses.count(200) == 5 and statuses.count(429) == 7
    finally:
        output = proxy.output()
    assert "Traceback" not in output
