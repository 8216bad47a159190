"""Realistic reseller traffic for ``make loadtest`` (driven by ``loadtests/loadtest.py``).

The plan (tenants, their hosts and allowed origins, keys with their rpm, bad keys) comes from
the JSON file named by ``LOADTEST_PLAN``, written by the driver after it has seeded Postgres.
Four kinds of users share one proxy:

- ``ResellerBackend``: a reseller's server with one of its keys: creates renders (POST), polls
  them (GET) and downloads them (GET .../stream?bytes=N, streamed by the echo upstream), on the
  tenant's custom domain, its ``<slug>.flatrender.test`` host or the platform apex (where the
  key's tenant becomes the request's), key as ``Authorization: Bearer`` or ``X-API-Key``;
- ``StudioEmbed``: the studio embedded on a reseller's site: CORS preflights (``OPTIONS`` with
  an ``Origin`` from the tenant's ``allowed_origins``) before its POSTs and GETs, embed pages,
  and now and then a preflight from an origin nobody allowed (403);
- ``GreedyClient``: one per over-limit key, sending several times its rpm and ignoring
  ``Retry-After``;
- ``BadKeyClient``: unknown keys, a real prefix with a wrong secret, a revoked key, no key,
  another tenant's key (401/403, never admitted).

At the end (``quitting``) the per-key counts go to ``LOADTEST_RESULTS`` (JSON) and
``loadcheck.check`` decides the exit status: no 5xx, every over-limit key limited consistently
with its rpm, no bad key admitted. Unexpected statuses are also locust failures (in the
report, and a non-zero exit through locust's own ``--exit-code-on-error``).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from locust import FastHttpUser, between, events, task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadcheck import KeyStats, RunStats, check

log = logging.getLogger("loadtest")


def _load_plan() -> dict[str, Any]:
    path = os.environ.get("LOADTEST_PLAN")
    if not path:
        return {"tenants": [], "keys": [], "bad_keys": [], "platform_domain": "flatrender.test"}
    plan: dict[str, Any] = json.loads(Path(path).read_text())
    return plan


PLAN = _load_plan()
TENANTS: dict[str, dict[str, Any]] = {t["slug"]: t for t in PLAN["tenants"]}
NORMAL_KEYS = [k for k in PLAN["keys"] if not k["over_limit"]]
OVER_KEYS = [k for k in PLAN["keys"] if k["over_limit"]]
RUN = RunStats(keys={k["name"]: KeyStats(k["rpm"], k["over_limit"]) for k in PLAN["keys"]})
DOWNLOAD_SIZES = (64 << 10, 256 << 10, 1 << 20, 4 << 20)


def _cycle(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return itertools.cycle(items) if items else iter(())


_next_normal, _next_over = _cycle(NORMAL_KEYS), _cycle(OVER_KEYS)
_next_tenant = _cycle(list(TENANTS.values()))
_next_bad = _cycle(PLAN["bad_keys"])


def _host_for(tenant: dict[str, Any], apex_share: float = 0.1) -> str:
    """Mostly the tenant's own hosts (custom domain first), sometimes the platform apex."""
    if random.random() < apex_share:
        return str(PLAN["platform_domain"])
    hosts: list[str] = tenant["hosts"]
    return hosts[0] if len(hosts) == 1 or random.random() < 0.65 else random.choice(hosts[1:])


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if random.random() < 0.7 else {"X-API-Key": key}


class _Client(FastHttpUser):
    abstract = True
    network_timeout = 30.0
    connection_timeout = 5.0

    def call(
        self,
        method: str,
        path: str,
        *,
        name: str,
        host: str,
        headers: dict[str, str] | None = None,
        expect: frozenset[int] = frozenset({200}),
        key: KeyStats | None = None,
        bad_key: bool = False,
        check_headers: dict[str, str | None] | None = None,
        **kwargs: Any,
    ) -> int:
        """One request, counted per key and per status; returns the status (0: no answer)."""
        sent = time.monotonic()
        if key is not None:
            key.record_sent(sent)
        if bad_key:
            RUN.bad_key_requests += 1
        all_headers = {"Host": host, "User-Agent": "flatrender-loadtest", **(headers or {})}
        with self.client.request(
            method, path, name=name, headers=all_headers, catch_response=True, **kwargs
        ) as resp:
            done, status = time.monotonic(), int(resp.status_code or 0)
            if status == 0:
                RUN.transport_errors += 1
                resp.failure(f"no answer: {resp.error!r}")
                return 0
            RUN.statuses[status] += 1
            if key is not None:
                limit, retry = (
                    resp.headers.get("X-RateLimit-Limit"),
                    resp.headers.get("Retry-After"),
                )
                key.record_answer(status, done, limit, retry)
            if bad_key and status not in (401, 403):
                RUN.bad_key_admitted += 1
            wrong = [
                f"{h}={resp.headers.get(h)!r}"
                for h, want in (check_headers or {}).items()
                if status < 400 and resp.headers.get(h) != want
            ]
            if status not in expect:
                resp.failure(f"status {status}: {resp.text[:200] if resp.text else ''}")
            elif wrong:
                resp.failure("unexpected headers: " + ", ".join(wrong))
            else:
                resp.success()
            return status


class ResellerBackend(_Client):
    """A reseller's server: creates, polls and downloads renders with one of its keys."""

    weight = 6
    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        self.plan_key = next(_next_normal)
        self.tenant = TENANTS[self.plan_key["tenant"]]
        self.stats = RUN.keys[self.plan_key["name"]]
        self.renders: list[str] = [str(uuid.uuid4())]

    def keyed(self, method: str, path: str, name: str, **kwargs: Any) -> int:
        return self.call(
            method,
            path,
            name=name,
            host=_host_for(self.tenant),
            headers=_auth(self.plan_key["key"]),
            expect=frozenset({200, 429}),
            key=self.stats,
            **kwargs,
        )

    @task(2)
    def create_render(self) -> None:
        body = {
            "template": random.choice(("promo-16x9", "story-9x16", "square-logo")),
            "resolution": random.choice(("HD", "FullHD")),
            "duration_sec": random.randint(5, 90),
            "assets": [f"https://cdn.example/{uuid.uuid4()}.png" for _ in range(3)],
        }
        if self.keyed("POST", "/v1/renders", "POST /v1/renders", json=body) == 200:
            self.renders = [*self.renders[-19:], str(uuid.uuid4())]

    @task(6)
    def poll_render(self) -> None:
        rid = random.choice(self.renders)
        self.keyed("GET", f"/v1/renders/{rid}", "GET /v1/renders/[id]")

    @task(1)
    def download_render(self) -> None:
        rid, size = random.choice(self.renders), random.choice(DOWNLOAD_SIZES)
        self.keyed("GET", f"/v1/renders/{rid}/stream?bytes={size}", "GET /v1/renders/[id]/stream")


class StudioEmbed(_Client):
    """The studio embedded on a reseller's site: preflights, keyed calls, embed pages."""

    weight = 2
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        self.tenant = next(_next_tenant)
        self.plan_key = next(k for k in NORMAL_KEYS if k["tenant"] == self.tenant["slug"])
        self.stats = RUN.keys[self.plan_key["name"]]
        self.origin = random.choice(self.tenant["origins"])

    def pick_host(self) -> str:
        return _host_for(self.tenant, apex_share=0.0)

    def preflight(self, method: str, path: str) -> int:
        return self.call(
            "OPTIONS",
            path,
            name=f"OPTIONS preflight ({method})",
            host=self.pick_host(),
            headers={
                "Origin": self.origin,
                "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": "authorization, content-type",
            },
            expect=frozenset({204}),
            check_headers={"Access-Control-Allow-Origin": self.origin},
        )

    def keyed(self, method: str, path: str, name: str, **kwargs: Any) -> None:
        self.call(
            method,
            path,
            name=name,
            host=self.pick_host(),
            headers={"Origin": self.origin, "Authorization": f"Bearer {self.plan_key['key']}"},
            expect=frozenset({200, 429}),
            key=self.stats,
            check_headers={"Access-Control-Allow-Origin": self.origin},
            **kwargs,
        )

    @task(3)
    def create_from_studio(self) -> None:
        if self.preflight("POST", "/v1/renders") == 204:
            self.keyed("POST", "/v1/renders", "POST /v1/renders (studio)", json={"t": "promo"})

    @task(5)
    def poll_from_studio(self) -> None:
        path = f"/v1/renders/{uuid.uuid4()}"
        if self.preflight("GET", path) == 204:
            self.keyed("GET", path, "GET /v1/renders/[id] (studio)")

    @task(2)
    def embed_page(self) -> None:
        self.call(
            "GET",
            f"/embed/player/{uuid.uuid4()}",
            name="GET /embed/player/[id]",
            host=self.pick_host(),
            headers={"Origin": self.origin},
        )

    @task(1)
    def foreign_origin_preflight(self) -> None:
        self.call(
            "OPTIONS",
            "/v1/renders",
            name="OPTIONS preflight (foreign origin)",
            host=self.pick_host(),
            headers={
                "Origin": "https://studio.not-a-reseller.test",
                "Access-Control-Request-Method": "POST",
            },
            expect=frozenset({403}),
        )


class GreedyClient(_Client):
    """One per over-limit key: about 12 times its refill rate, Retry-After ignored."""

    fixed_count = len(OVER_KEYS)

    def on_start(self) -> None:
        self.plan_key = next(_next_over)
        self.tenant = TENANTS[self.plan_key["tenant"]]
        self.stats = RUN.keys[self.plan_key["name"]]
        # rpm/5 a second spends the burst within ~6 s and then runs at 12x the refill rate
        self.interval = 1.0 / max(5.0, self.plan_key["rpm"] / 5.0)

    def wait_time(self) -> float:
        # constant pacing at this key's own interval (locust's helper takes a fixed one)
        run = time.perf_counter() - self._cp_last_run - self._cp_last_wait_time
        self._cp_last_wait_time = max(0.0, self.interval - run)
        self._cp_last_run = time.perf_counter()
        return self._cp_last_wait_time

    @task
    def hammer(self) -> None:
        post = random.random() < 0.3
        self.call(
            "POST" if post else "GET",
            "/v1/renders" if post else f"/v1/renders/{uuid.uuid4()}",
            name="over-limit key (POST/GET)",
            host=_host_for(self.tenant, apex_share=0.0),
            headers=_auth(self.plan_key["key"]),
            expect=frozenset({200, 429}),
            key=self.stats,
            **({"json": {"template": "spam"}} if post else {}),
        )


class BadKeyClient(_Client):
    """Keys that must never get through: 401/403, and no token taken from anyone."""

    fixed_count = 2
    wait_time = between(0.05, 0.25)

    @task
    def bad_request(self) -> None:
        bad = next(_next_bad)
        tenant = TENANTS[bad["host_tenant"]]
        headers = {"Authorization": f"Bearer {bad['key']}"} if bad["key"] else {}
        self.call(
            "GET",
            f"/v1/renders/{uuid.uuid4()}",
            name=f"bad key: {bad['why']}",
            host=_host_for(tenant, apex_share=0.0),
            headers=headers,
            expect=frozenset({bad["expect"]}),
            bad_key=True,
        )


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    if not PLAN["keys"]:
        log.error("locustfile: no plan (LOADTEST_PLAN unset or empty); run `make loadtest`")
        environment.process_exit_code = 2
        if environment.runner is not None:
            environment.runner.quit()


@events.quitting.add_listener
def _on_quitting(environment: Any, **_: Any) -> None:
    if not PLAN["keys"]:
        return
    results = os.environ.get("LOADTEST_RESULTS")
    if results:
        Path(results).write_text(json.dumps(RUN.to_json(), indent=1))
    failures = check(RUN)
    for failure in failures:
        log.error("check failed: %s", failure)
    if failures:
        environment.process_exit_code = 1
    else:
        log.info("checks passed: no 5xx, every over-limit key limited within its rpm")
