"""Traces and metrics, every instrument in one place (CONTRACT §10).

- Traces: OpenTelemetry SDK with a tracer provider private to this object (no global state).
  One server span per request, continuing an incoming W3C ``traceparent``, with child spans per
  stage; the upstream gets ``traceparent`` naming the proxy's upstream span. Exporter and
  sampler come from the standard ``OTEL_*`` variables (read by ``settings``). With the exporter
  ``none`` there is no tracer at all: ``span()`` hands back one shared no-op context manager.
  Even then the upstream's ``traceparent`` continues the client's trace with a span id of the
  proxy's own (CONTRACT §10): only an id is needed, not a span. Only ``OTEL_SDK_DISABLED=true``
  and the sampler ``always_off`` leave tracing out altogether: the client's ``traceparent``
  then passes unchanged, and none is sent when the client sent none.
- Metrics: ``prometheus-client``, one registry per process. Per-request figures (requests and
  latency by route and status class, upstream errors) are instruments updated by the stages;
  figures the stores already count (limiter decisions, cache hits, audit queue, store errors)
  are read at scrape time by a collector, costing the request path nothing. Label values are
  bounded: route prefixes from the configuration, status classes, fixed outcome names.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from multidict import CIMultiDict
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    Span,
    SpanKind,
    Tracer,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from proxy.core.tracecontext import child_traceparent
from proxy.gcpauses import GcPauses
from proxy.settings import TelemetrySettings

_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()
_PROPAGATOR = TraceContextTextMapPropagator()
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _sampler(settings: TelemetrySettings) -> Sampler:
    ratio = TraceIdRatioBased(settings.sampler_arg)
    return {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": ratio,
        "parentbased_always_on": ParentBased(ALWAYS_ON),
        "parentbased_always_off": ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": ParentBased(ratio),
    }[settings.sampler]


def _passthrough(settings: TelemetrySettings) -> bool:
    """Tracing left out altogether: the client's traceparent is forwarded as received."""
    return settings.sdk_disabled or settings.sampler == "always_off"


def span_exporter(settings: TelemetrySettings) -> Callable[[], SpanExporter] | None:
    """What makes the configured exporter, or None when nothing is exported. A ``ConfigError``
    when the exporter's package is missing: ``serve`` and ``check`` both ask before starting."""
    if _passthrough(settings):
        return None
    if settings.traces_exporter == "console":
        return ConsoleSpanExporter
    if settings.traces_exporter == "otlp":
        from proxy.settings import ConfigError

        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError:
            raise ConfigError(
                "OTEL_TRACES_EXPORTER: otlp needs opentelemetry-exporter-otlp installed"
            ) from None
        make: Callable[[], SpanExporter] = OTLPSpanExporter
        return make
    return None


class Telemetry:
    def __init__(self, settings: TelemetrySettings, exporter: SpanExporter | None = None) -> None:
        """``exporter`` overrides the configured one (tests pass an in-memory exporter, which
        is then fed synchronously)."""
        self.tracer: Tracer | None = None
        self._provider: TracerProvider | None = None
        self._passthrough = _passthrough(settings)
        make = None if exporter else span_exporter(settings)
        chosen = None if self._passthrough else exporter or (make() if make else None)
        if chosen is not None:
            self._provider = TracerProvider(
                resource=Resource.create({"service.name": settings.service_name}),
                sampler=_sampler(settings),
            )
            processor = SimpleSpanProcessor(chosen) if exporter else BatchSpanProcessor(chosen)
            self._provider.add_span_processor(processor)
            self.tracer = self._provider.get_tracer("flatrender-edge")
        self.registry = CollectorRegistry()
        # Collections per generation (python_gc_*): a full collection is a pause for every
        # request in flight, and app.freeze_startup_objects exists to keep them short.
        GCCollector(registry=self.registry)
        self.gc_pauses = GcPauses()
        self.gc_pauses.install()
        self.collect_from(self.gc_pauses.collect)
        self.collect_from(_process_figures)
        self._requests = Counter(
            "edge_requests",
            "Requests answered, by route and status class",
            ["route", "status_class"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "edge_request_duration_seconds",
            "Time to the last byte, by route and status class",
            ["route", "status_class"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._upstream_errors = Counter(
            "edge_upstream_errors",
            "Upstream failures, by upstream and kind",
            ["upstream", "kind"],
            registry=self.registry,
        )
        self._finisher_failures = Counter(
            "edge_request_finisher_failures",
            "Request bookkeeping steps that raised (logged; the request's other steps still ran)",
            ["finisher"],
            registry=self.registry,
        )
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._webhook_attempts = Counter(
            "edge_webhook_attempts",
            "Webhook delivery attempts made, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self._webhook_latency = Histogram(
            "edge_webhook_attempt_duration_seconds",
            "Time from sending a webhook request to its answer (or failure)",
            buckets=BUCKETS,
            registry=self.registry,
        )

    # -- tracing

    def server_span(
        self, method: str, headers: Mapping[str, str]
    ) -> contextlib.AbstractContextManager[Span | None]:
        if self.tracer is None:
            return _NO_SPAN
        return self.tracer.start_as_current_span(
            f"{method}", kind=SpanKind.SERVER, context=_PROPAGATOR.extract(headers)
        )

    def span(
        self, name: str, kind: SpanKind = SpanKind.INTERNAL
    ) -> contextlib.AbstractContextManager[Span | None]:
        if self.tracer is None:
            return _NO_SPAN
        return self.tracer.start_as_current_span(name, kind=kind)

    def inject(
        self, headers: CIMultiDict[str], span: Span | None, inbound: Mapping[str, str]
    ) -> None:
        """Set ``traceparent`` (and ``tracestate``) for the upstream from the proxy's span, or,
        without one, from the client's trace and an id of the proxy's own (W3C Trace Context
        §3.2: a participant forwards the trace-id and replaces the parent-id with its own; the
        client's ``tracestate`` passed the header filter and goes with it)."""
        if self._passthrough:
            return  # whatever the client sent passed the header filter unchanged
        if span is None:
            headers["traceparent"], continued = child_traceparent(inbound.get("traceparent"))
            if not continued:
                # A tracestate belongs to the traceparent it came with (W3C Trace Context
                # §3.3): not to a new trace.
                headers.popall("tracestate", None)
            return
        _PROPAGATOR.inject(headers, context=set_span_in_context(span))

    # -- metrics

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, f"{status // 100}xx")
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self._requests.labels(*key),
                self._latency.labels(*key),
            )
        children[0].inc()
        children[1].observe(seconds)

    def upstream_error(self, upstream: str, kind: str) -> None:
        self._upstream_errors.labels(upstream, kind).inc()

    def finisher_failed(self, finisher: str) -> None:
        """``finisher``: ``quota`` (the render quota's settlement) or ``audit`` (the row)."""
        self._finisher_failures.labels(finisher).inc()

    def webhook_outcomes(self, outcomes: Iterable[str]) -> None:
        """Expose each outcome's attempt count at zero before its first attempt: a series that
        appears only with its first increment hides that first increase from ``rate()`` and
        leaves dashboards and alerts without a series to read (Prometheus instrumentation
        practice: initialise the label values known in advance)."""
        for outcome in outcomes:
            self._webhook_attempts.labels(outcome)

    def webhook_attempt(self, outcome: str, seconds: float | None) -> None:
        """``outcome``: one of ``webhooks.dispatcher.ATTEMPT_OUTCOMES``; ``seconds`` None when
        nothing was sent."""
        self._webhook_attempts.labels(outcome).inc()
        if seconds is not None:
            self._webhook_latency.observe(seconds)

    def collect_from(self, read: Callable[[], Iterable[Metric]]) -> None:
        """Register figures read at scrape time (counters the stores keep anyway)."""

        class _Collector:
            def collect(self) -> Iterable[Metric]:
                return read()

        self.registry.register(_Collector())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        self.gc_pauses.uninstall()
        if self._provider is not None:
            self._provider.shutdown()


def _process_figures() -> Iterator[Metric]:
    yield gauge(
        "edge_gc_frozen_objects",
        "Objects kept out of the cyclic collector since start-up (gc.freeze)",
        gc.get_freeze_count(),
    )
    with contextlib.suppress(RuntimeError):  # scraped outside the event loop: no figure
        # Requests in flight plus the background jobs: a number that only grows is a leak.
        yield gauge("edge_asyncio_tasks", "Tasks on the event loop", len(asyncio.all_tasks()))


def counter(
    name: str, doc: str, labels: list[str], values: Iterable[tuple[list[str], float]]
) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family


def gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(name, doc, value=value)


def gauges(
    name: str, doc: str, labels: list[str], values: Iterable[tuple[list[str], float]]
) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family
