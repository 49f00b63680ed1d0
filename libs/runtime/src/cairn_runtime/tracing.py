"""OpenTelemetry set-up: one tracer provider per process, exporter chosen by configuration.

`file` writes one JSON object per finished span to a file (the end-to-end tests read it);
`otlp` sends to a collector; `console` prints spans; `none` keeps propagation but exports nothing.

Sampling: everything that belongs to a trace is kept, and a client span (a MongoDB command, a
Redis call) with no parent starts no trace of its own: heartbeats, periodic counts and session
clean-ups would otherwise bury the traces of jobs under one-span traces.
"""

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision, ParentBased, Sampler, SamplingResult

from cairn_runtime.log import bind


class JsonLinesSpanExporter(SpanExporter):
    """Appends spans as JSON lines; safe for several processes appending to one file."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(span.to_json(indent=None) + "\n" for span in spans)
        with self._lock:
            # O_APPEND writes of one buffer do not interleave with other processes' lines.
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, lines.encode())
            finally:
                os.close(fd)
        return SpanExportResult.SUCCESS


class NoOrphanClientSpans(Sampler):
    """Root sampler: drop a CLIENT span that has no parent, keep every other root."""

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None):
        if kind == trace.SpanKind.CLIENT:
            return SamplingResult(Decision.DROP)
        return ALWAYS_ON.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return "NoOrphanClientSpans"


def cairn_sampler() -> Sampler:
    """Children follow their parent's decision; roots are kept unless they are lone client calls."""
    return ParentBased(root=NoOrphanClientSpans())


def setup_tracing(service_name: str, exporter: str, *, trace_file: str, otlp_endpoint: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}), sampler=cairn_sampler())
    if exporter == "file":
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(trace_file)))
    elif exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{otlp_endpoint.rstrip('/')}/v1/traces"))
        )
    trace.set_tracer_provider(provider)
    return provider


def span_attributes(**attributes: object) -> dict[str, str | int | float | bool]:
    """Span attributes without the unset ones (OpenTelemetry rejects None)."""
    return {f"cairn.{k}": v for k, v in attributes.items() if v is not None}  # type: ignore[misc]


def annotate_current_span(**attributes: object) -> None:
    """Add `cairn.*` attributes to the span in progress (no-op without one)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(span_attributes(**attributes))


def describe_work(job_id: str | None = None, shard_key: str | None = None, **attributes: object) -> None:
    """Name the job (and shard) the work in progress is about: `cairn.*` attributes on the current
    span, and job/shard ids on every log line of the current context (see `log.log_context`)."""
    annotate_current_span(job_id=job_id, shard_key=shard_key, **attributes)
    bind(job_id=job_id, shard_key=shard_key)


def message_attributes(message: object) -> dict[str, str]:
    """What a contract message says about the job it concerns: job_id, shard_key, tenant and
    pipeline, for span attributes and log context (read by name, so any message type works)."""
    spec = getattr(message, "spec", None)
    found = {
        "job_id": getattr(message, "job_id", None),
        "shard_key": getattr(message, "shard_key", None),
        "tenant": getattr(message, "tenant", None),
        "pipeline": getattr(spec, "pipeline", None),
    }
    return {k: v for k, v in found.items() if isinstance(v, str)}




_tracer = trace.get_tracer("cairn_runtime")


def trace_carrier() -> dict[str, str]:
    """The current trace context as W3C headers (`traceparent`, `tracestate`), to be stored with
    work that another process picks up later (a retry that waits in MongoDB); {} outside a trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@contextmanager
def continued_trace(carrier: object) -> Iterator[None]:
    """Continue the trace a `trace_carrier()` stored: spans started inside (the Celery publish of
    a due retry) are children of the work that stored it, so a job stays one trace across a wait
    in MongoDB. No carrier (or not a mapping): nothing is attached."""
    if not isinstance(carrier, dict) or not carrier:
        yield
        return
    token = otel_context.attach(propagate.extract({k: v for k, v in carrier.items() if isinstance(v, str)}))
    try:
        yield
    finally:
        otel_context.detach(token)


@contextmanager
def producer_span(exchange: str, routing_key: str, message: object) -> Iterator[None]:
    """A PRODUCER span around a publish, made current so that the headers built inside it carry
    its context: the consumer's span becomes its child. Only inside traced work: a publish with no
    span in progress (a periodic relay) starts no trace and carries no trace context."""
    if not trace.get_current_span().get_span_context().is_valid:
        yield
        return
    attributes = {
        "messaging.system": "rabbitmq",
        "messaging.operation": "publish",
        "messaging.destination.name": exchange,
        "messaging.rabbitmq.destination.routing_key": routing_key,
        "messaging.message.type": getattr(message, "message_type", type(message).__name__),
        **span_attributes(**message_attributes(message)),
    }
    with _tracer.start_as_current_span(f"publish {exchange}", kind=trace.SpanKind.PRODUCER, attributes=attributes):
        yield
