"""Traces: OpenTelemetry, switched on and pointed the standard way, off by default.

    OTEL_TRACES_EXPORTER=otlp  OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318  OTEL_SERVICE_NAME=classifier

`OTEL_TRACES_EXPORTER` is this service's setting (settings.py: `none` by default, where the specification's
default is `otlp`: a service must not start sending to a collector nobody configured). Everything else is read
by the OpenTelemetry SDK itself from its own variables: the endpoint, headers and timeout of the OTLP/HTTP
exporter, the sampler (`OTEL_TRACES_SAMPLER`, `_ARG`), the export queue (`OTEL_BSP_*`), the resource
(`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`) and the propagators (W3C trace context by default).

Off, nothing is instrumented and the pipeline's spans come from the API's no-op tracer. On, spans are exported
from a bounded queue by the SDK's own thread: a collector that is down or slow never slows a request, and the
spans it cannot take are dropped and counted (tracing_spans_dropped_total).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.metrics import NoOpMeter, NoOpMeterProvider
from opentelemetry.trace import Link, SpanContext, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter

log = logging.getLogger(__name__)

SPANS_DROPPED = Counter("tracing_spans_dropped_total",
                        "Spans the export queue could not take (the collector is down or slow), by why", ["reason"])
SPANS_DROPPED.labels("queue_full")

NO_TRACER: Tracer = trace.NoOpTracer()
_W3C = TraceContextTextMapPropagator()


class Tracing:
    """The tracer provider a process exports through, or none (tracing off)."""

    def __init__(self, exporter: str) -> None:
        self.provider = _provider(exporter) if exporter != "none" else None
        self.tracer: Tracer = self.provider.get_tracer("classifier") if self.provider else NO_TRACER

    def instrument(self, app: Any) -> None:
        """The FastAPI app: a server span per request, continuing the caller's trace (traceparent)."""
        if self.provider is None:
            return
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        # Its "receive" spans would be one per chunk of an upload, its "send" spans two per response (the headers,
        # the body), which cost ~4 % of c=8's throughput on 2 cores: observability.Observe has one `respond` span
        # instead. Probes and scrapes (every few seconds, from Kubernetes and Prometheus) are not traced unless the
        # variable says so.
        probes = os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", r"/health$,/ready$,/metrics$")
        FastAPIInstrumentor.instrument_app(app, tracer_provider=self.provider, exclude_spans=["receive", "send"],
                                           excluded_urls=probes)

    def grpc_interceptors(self) -> list[Any]:
        """A server span per gRPC call, continuing the trace in the call's metadata."""
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return [aio_server_interceptor(tracer_provider=self.provider)]

    def instrument_client(self, client: Any) -> None:
        """An httpx client (webhooks): a span per request, and traceparent sent with it."""
        if self.provider is None:
            return
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor.instrument_client(client, tracer_provider=self.provider)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Export what is queued, waiting at most timeout_s: a collector that is down must not hold up an exit
        (the SDK's own bound is 30 s, a Kubernetes pod's whole grace period)."""
        if self.provider is not None:
            exporting = threading.Thread(target=self.provider.shutdown, name="tracing shutdown", daemon=True)
            exporting.start()
            exporting.join(timeout_s)


def current() -> SpanContext:
    """The span context of the caller here (invalid when tracing is off or nobody traces this)."""
    return trace.get_current_span().get_span_context()


def links(contexts: Sequence[SpanContext]) -> list[Link]:
    return [Link(context) for context in contexts if context.is_valid]


def ids() -> tuple[str, str] | None:
    """The current trace and span ids in hex, for log lines and the X-Trace-Id header; None when not traced."""
    context = current()
    if not context.is_valid:
        return None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


def traceparent() -> str | None:
    """The current span as a W3C traceparent, to store (a job's submission) and continue later; None untraced."""
    if not current().is_valid:
        return None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent")


def stored(traceparent: str | None) -> SpanContext:
    """A span context stored as a traceparent (invalid for None)."""
    if not traceparent:
        return trace.INVALID_SPAN_CONTEXT
    return trace.get_current_span(_W3C.extract({"traceparent": traceparent})).get_span_context()


def under(context: SpanContext) -> Any:
    """An OpenTelemetry context whose current span is `context`: the parent for a span started elsewhere."""
    return trace.set_span_in_context(trace.NonRecordingSpan(context))


def _provider(exporter: str) -> Any:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter()
    else:
        span_exporter = ConsoleSpanExporter()
    provider = TracerProvider(resource=Resource.create())  # sampler and resource: from OTEL_* by the SDK
    # The SDK counts its dropped spans only where its own metrics are switched on; they go to _DropCounter alone.
    os.environ.setdefault("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
    # ...and it also logs a warning per dropped span: thousands a second while a collector is down.
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
    provider.add_span_processor(BatchSpanProcessor(span_exporter, meter_provider=_DropCounter()))
    log.info("tracing on: spans exported by %s (%s)", exporter, type(span_exporter).__name__)
    return provider


class _DropCounter(NoOpMeterProvider):
    """The SDK reports the spans its export queue drops through the OpenTelemetry metrics API; this service's
    metrics are Prometheus's, so that one counter is kept there and the rest is ignored."""

    def get_meter(self, name: str, *args: Any, **kwargs: Any) -> NoOpMeter:
        return _DropMeter(name)


class _DropMeter(NoOpMeter):
    def create_counter(self, name: str, *args: Any, **kwargs: Any) -> Any:
        counter = super().create_counter(name, *args, **kwargs)
        if name == "otel.sdk.processor.span.processed":
            counter.add = _count_dropped  # type: ignore[method-assign]
        return counter


def _count_dropped(amount: int, attributes: dict[str, Any] | None = None, *args: Any, **kwargs: Any) -> None:
    reason = (attributes or {}).get("error.type")
    if reason:  # processed without an error type: exported, not dropped
        SPANS_DROPPED.labels(str(reason)).inc(amount)
