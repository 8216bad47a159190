"""Per-request state shared by the pipeline stages, stored on the request under ``CTX``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from collections.abc import Mapping

    from proxy.core.apikeys import ApiKey
    from proxy.core.tenancy import Tenant
    from proxy.settings import RouteSettings
    from proxy.upstreams import UpstreamPool


@dataclass(slots=True)
class RequestContext:
    request_id: str
    started: float  # loop.time() at arrival
    client_ip: str = ""
    forwarded_for: str = ""
    host: str = ""
    path: str = ""  # resolved path (CONTRACT §7), what routing and the upstream see
    query: str = ""
    route: RouteSettings | None = None
    # The pools of the configuration ``route`` came from (one snapshot: see upstreams.Routing).
    pools: Mapping[str, UpstreamPool] | None = None
    tenant: Tenant | None = None
    via_platform: bool = False  # the Host was a platform domain itself (CONTRACT §5)
    api_key: ApiKey | None = None  # identified by auth; authorised once the auth stage passed
    response_headers: dict[str, str] = field(default_factory=dict)
    error_code: str | None = None
    limit_decision: str | None = None  # "allowed" | "rejected" | "shadow"
    upstream_s: float = 0.0  # time spent with the upstream (access log)
    upstream_status: int | None = None  # the upstream's answer began, with this status
    render_started: bool = False  # a metered POST the upstream answered 2xx (CONTRACT §13)
    continue_sent: bool = False  # "100 Continue" went out (Expect: 100-continue)
    body_refused: bool = False  # the connection refused the body's framing (a 400, not a 499)
    span: Any = None  # the server span when tracing is on
    audited_at: datetime | None = None  # the audit row's created_at, on an audited route
    quota_held: tuple[str, str, Any] | None = None  # (tenant, month, reservation) to settle
    plan: Any = None  # the route's plan (pipeline.plan.RoutePlan), once routed


CTX = web.RequestKey("flatrender_ctx", RequestContext)
# The version a request line named when it was not HTTP/1.x (the request itself is
# rebuilt as HTTP/1.1 so that the refusal's status line is one the client can read).
UNSERVED_VERSION = web.RequestKey("flatrender_unserved_version", str)
# The scheme of the client's own connection when a front relayed it with the PROXY protocol
# and said it was TLS (PROXY v2 PP2_TYPE_SSL); absent: the scheme of the connection received.
CLIENT_SCHEME = web.RequestKey("flatrender_client_scheme", str)
