"""The request handler: one composed function per request, and a plan per route.

aiohttp middlewares would show the stages as a chain, but each layer is a frame, a closure and
an await per request (DESIGN "The hot path is a plan, not a chain"). Here the stages every
request needs run in contract order in one function, with one ``try``/``finally`` for errors,
the audit row, metrics and the access log. What depends on the route is decided when the route
table is built (at start-up and at each reload), as a ``RoutePlan``: whether the route is
audited, and the steps it runs between audit and forwarding. A route with ``auth = "none"``,
audit off and no rate limit that applies runs only the tenant's status check there: no auth,
audit, quota or limiter code.

The order (CONTRACT §3-§13): entry (request id, client address, errors) → target (Host, path)
→ challenge (custom-domain verification) → tenant → cors → route → audit → access (key
identified, tenant status, key authorised) → render quota → rate limit → forward. CORS sits
before routing and the status check so that their refusals carry CORS headers too, and answers
preflights before anything is audited (they are not rows); audit needs the route (is it an
audit route?) and sits outside the status check, auth and rate limiting so that every refusal
of a resolved tenant is recorded (§9); the quota comes before the rate limit so that a quota
refusal spends no token (§13), and settles once the answer is known, before the audit row
(which says whether a render started).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

from proxy.access_log import AccessLog
from proxy.context import UNSERVED_VERSION, RequestContext
from proxy.core.forwarding import IPNetwork
from proxy.core.routes import RouteTable
from proxy.errors import ClientClosedRequest, HttpVersionNotSupported
from proxy.pipeline.audit import AuditStage
from proxy.pipeline.cors import cors_stage
from proxy.pipeline.entry import (
    body_bytes,
    failure_response,
    finish,
    new_context,
    stamp_response,
)
from proxy.pipeline.quota import QuotaStage
from proxy.pipeline.ratelimit import applies_to as limits_apply
from proxy.pipeline.routing import is_challenge, route_stage, target_stage
from proxy.pipeline.tenant import TenantStage
from proxy.settings import RatelimitSettings, RouteSettings
from proxy.telemetry import Telemetry
from proxy.upstreams import Routing, RoutingSnapshot

Step = Callable[[web.Request, RequestContext], Awaitable[None]]
Finish = Callable[[RequestContext], None]

log = logging.getLogger("proxy.plan")


@dataclass(frozen=True, slots=True)
class RoutePlan:
    route: RouteSettings
    audited: bool
    steps: tuple[Step, ...]  # between audit and forwarding, in contract order
    # Once the answer is known, before the audit row; each named for the failures metric.
    finishers: tuple[tuple[str, Finish], ...]

    @property
    def prefix(self) -> str:  # what RouteTable matches on
        return self.route.prefix


class Planner:
    """Composes a route's plan from the stages built once in ``app.build_app``."""

    def __init__(
        self,
        *,
        audited: bool,
        auth: Step,
        open_access: Step,
        quota: QuotaStage,
        ratelimit: Step,
        ratelimit_settings: RatelimitSettings,
    ) -> None:
        self._audited = audited  # whether there is an audit sink at all
        self._auth = auth
        self._open = open_access
        self._quota = quota
        self._ratelimit = ratelimit
        self._ratelimit_settings = ratelimit_settings

    def plan(self, route: RouteSettings) -> RoutePlan:
        steps: list[Step] = []
        finishers: list[tuple[str, Finish]] = []
        steps.append(self._auth if route.auth != "none" else self._open)
        if route.meter is not None:  # before the rate limit: a refusal spends no token (§13)
            steps.append(self._quota.step)
            finishers.append(("quota", self._quota.finish))
        if limits_apply(route, self._ratelimit_settings):
            steps.append(self._ratelimit)
        audited = route.audit and self._audited
        return RoutePlan(route, audited, tuple(steps), tuple(finishers))


class Pipeline:
    """The application's one handler (the catch-all route's)."""

    def __init__(
        self,
        *,
        routing: Routing,
        planner: Planner,
        audit: AuditStage | None,
        trusted_proxies: Sequence[IPNetwork],
        challenge: Callable[[RequestContext], Awaitable[web.Response]],
        tenant: TenantStage,
        forward: Callable[[web.Request], Awaitable[web.StreamResponse]],
        telemetry: Telemetry,
        access: AccessLog | None,
    ) -> None:
        self._routing = routing
        self._planner = planner
        self._audit = audit
        self._trusted = tuple(trusted_proxies)
        self._challenge = challenge
        self._tenant = tenant
        self.forward = forward  # the last stage (pipeline.forward's Forwarder.handle)
        self._telemetry = telemetry
        self._access = access
        self._current: tuple[RoutingSnapshot, RouteTable[RoutePlan]]
        self.replan()

    def replan(self) -> None:
        """Compose every route's plan from the routing in force: at start-up, and after each
        reload. The plans and the snapshot they came from are replaced together, so a request
        forwards with the pools of the configuration its route is from."""
        snapshot = self._routing.current
        self._current = (snapshot, RouteTable(self._planner.plan(r) for r in snapshot.table))

    def route_for(self, path: str) -> RouteSettings | None:
        """The route a request for ``path`` takes under the routing in force (``/explain``)."""
        plan = self._current[1].match(path)
        return None if plan is None else plan.route

    async def handle(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        ctx = new_context(request, self._trusted, loop.time())
        status, sent = 500, 0
        with self._telemetry.server_span(request.method, request.headers) as span:
            ctx.span = span
            try:
                try:
                    response = await self._run(request, ctx)
                except (asyncio.CancelledError, ConnectionResetError):
                    raise
                except Exception as e:
                    response = failure_response(e, ctx)
                    stamp_response(request, ctx, response)
                status, sent = response.status, body_bytes(request.method, response)
                return response
            except (asyncio.CancelledError, ConnectionResetError):
                status = ClientClosedRequest.status
                raise
            finally:
                # What follows runs for every request however each part fares: one row per
                # request (§9), its metrics and its access-log line.
                plan = ctx.plan
                if plan is not None:
                    for name, finish_stage in plan.finishers:
                        try:
                            finish_stage(ctx)
                        except Exception:
                            self._finish_failed(name, ctx)
                if ctx.audited_at is not None and self._audit is not None:
                    try:
                        self._audit.finish(request, ctx, status)
                    except Exception:
                        self._finish_failed("audit", ctx)
                elapsed = loop.time() - ctx.started
                finish(request, ctx, status, sent, elapsed, self._telemetry, self._access)

    def _finish_failed(self, name: str, ctx: RequestContext) -> None:
        log.exception("finishing request_id=%s failed in %s", ctx.request_id, name)
        self._telemetry.finisher_failed(name)

    async def _run(self, request: web.Request, ctx: RequestContext) -> web.StreamResponse:
        if UNSERVED_VERSION in request:
            raise HttpVersionNotSupported()
        target_stage(request, ctx)
        if is_challenge(request, ctx):
            answer = await self._challenge(ctx)
            stamp_response(request, ctx, answer)
            return answer
        if not self._tenant.known(ctx):  # a cache hit is answered without an await
            await self._tenant.load(ctx)
        preflight = cors_stage(request, ctx)
        if preflight is not None:
            stamp_response(request, ctx, preflight)
            return preflight
        snapshot, plans = self._current
        plan = plans.match(ctx.path)
        route_stage(ctx, plan.route if plan is not None else None, snapshot.pools)
        assert plan is not None  # route_stage refused a path without a route
        ctx.plan = plan
        if plan.audited and self._audit is not None:
            self._audit.start(ctx)
        for step in plan.steps:
            await step(request, ctx)
        return await self.forward(request)
