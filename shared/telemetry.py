"""Tracing: one OpenTelemetry trace per turn, carried through Kafka headers.

Every record a service consumes may carry a W3C ``traceparent`` header. The service
handles the record inside a span whose parent is that context (:func:`consume_span`)
and stamps the records it publishes with the current span's context
(:func:`trace_headers`), so a turn's records — UserMessage, TurnRequested, ToolCalls,
ToolResults, SessionEvents, the AgentResponse — form one trace across ingress,
reasoning, tool-exec and checkpoint. The trace id is also stored on every
SessionEvent (:func:`current_trace_id`), which is how ``agentctl trace`` finds a turn's
trace from Cassandra.

Adapters (Cassandra, Redis, Triton) open child spans with :func:`child_span`, which
records nothing outside a traced operation (readiness probes and background scans
make no root spans).

Export: OTLP over gRPC when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, with the SDK's standard ``OTEL_*``
variables (headers, sampler, batch delays); otherwise JSON lines, one file per process,
under ``AGENTBUS_TRACE_DIR`` (the local stack's default, read by ``agentctl trace``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.settings import ServiceSettings

__all__ = [
    "TRACE_HEADERS",
    "JsonLinesSpanExporter",
    "child_span",
    "configure_tracing",
    "consume_span",
    "current_trace_id",
    "make_exporter",
    "mark_error",
    "record_attributes",
    "shutdown_tracing",
    "start_child_span",
    "start_consume_span",
    "trace_headers",
    "tracer",
]

TRACE_HEADERS = ("traceparent", "tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()


_TRACER: tuple[object, trace.Tracer] | None = None


def tracer() -> trace.Tracer:
    """The agentbus tracer of the current provider (cached: ``get_tracer`` is costly per span)."""
    global _TRACER
    provider = trace.get_tracer_provider()
    cached = _TRACER
    if cached is None or cached[0] is not provider:
        cached = _TRACER = (provider, trace.get_tracer("agentbus", tracer_provider=provider))
    return cached[1]


class JsonLinesSpanExporter(SpanExporter):
    """Finished spans as JSON lines in one file (this process's own: no interleaving).

    One line per span: ``trace_id``, ``span_id``, ``parent_id`` (hex), ``name``,
    ``service``, ``kind``, ``start_ns``, ``end_ns``, ``status``, ``attributes``.
    """

    def __init__(self, path: Path, service: str) -> None:
        self.path = path
        self.service = service
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    @staticmethod
    def line(span: ReadableSpan, service: str) -> dict[str, Any]:
        ctx = span.get_span_context()
        assert ctx is not None
        parent = span.parent
        return {
            "trace_id": f"{ctx.trace_id:032x}",
            "span_id": f"{ctx.span_id:016x}",
            "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
            "name": span.name,
            "service": str(span.resource.attributes.get("service.name", service)),
            "kind": span.kind.name,
            "start_ns": span.start_time,
            "end_ns": span.end_time,
            "status": span.status.status_code.name,
            "attributes": {k: _plain(v) for k, v in (span.attributes or {}).items()},
        }

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        text = "".join(json.dumps(self.line(s, self.service), separators=(",", ":")) + "\n" for s in spans)
        try:
            with self._lock:
                self._file.write(text)
                self._file.flush()
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
        return True


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def make_exporter(settings: ServiceSettings, environ: Mapping[str, str]) -> SpanExporter | None:
    """OTLP/gRPC when an OTLP endpoint is configured, else JSON lines in ``trace_dir`` (or none)."""
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # endpoint, headers, TLS from the standard OTEL_* variables
    if settings.trace_dir:
        name = f"{settings.service_name}-{socket.gethostname()}-{os.getpid()}.jsonl"
        return JsonLinesSpanExporter(Path(settings.trace_dir) / name, settings.service_name)
    return None


def configure_tracing(settings: ServiceSettings) -> TracerProvider:
    """Install this process's tracer provider and its exporter (see the module docstring)."""
    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME") or settings.service_name,
            "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
        }
    )
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    exporter = make_exporter(settings, os.environ)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def shutdown_tracing() -> None:
    """Flush and stop the exporter (at process exit)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def _carrier(headers: Sequence[tuple[str, bytes]] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in headers or ():
        if key in TRACE_HEADERS and value is not None:
            with contextlib.suppress(UnicodeDecodeError):
                out[key] = value.decode("ascii")
    return out


@contextlib.contextmanager
def consume_span(
    name: str,
    headers: Sequence[tuple[str, bytes]] | None,
    *,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """A CONSUMER span for one record, child of the context in its ``traceparent`` header.

    Without a (valid) header it is the root of a new trace. An exception escaping the
    block marks the span as an error and propagates.
    """
    parent = _PROPAGATOR.extract(_carrier(headers))
    with tracer().start_as_current_span(
        name, context=parent, kind=SpanKind.CONSUMER, attributes=dict(attributes or {})
    ) as span:
        yield span


def record_attributes(record: Any) -> dict[str, Any]:
    """Span attributes naming a consumed Kafka record."""
    return {
        "messaging.system": "kafka",
        "messaging.destination.name": record.topic,
        "messaging.kafka.partition": record.partition,
        "messaging.kafka.offset": record.offset,
    }


def start_consume_span(
    name: str, headers: Sequence[tuple[str, bytes]] | None, *, attributes: Mapping[str, Any] | None = None
) -> Span:
    """Like :func:`consume_span`, not made current; the caller ends it (batched work)."""
    parent = _PROPAGATOR.extract(_carrier(headers))
    kind = SpanKind.CONSUMER
    return tracer().start_span(name, context=parent, kind=kind, attributes=dict(attributes or {}))


@contextlib.contextmanager
def child_span(
    name: str, *, kind: SpanKind = SpanKind.CLIENT, attributes: Mapping[str, Any] | None = None
) -> Iterator[Span | None]:
    """A child of the current span, or nothing (``None``) when no traced operation is running."""
    if not trace.get_current_span().get_span_context().is_valid:
        yield None
        return
    with tracer().start_as_current_span(name, kind=kind, attributes=dict(attributes or {})) as span:
        yield span


def start_child_span(
    name: str, *, kind: SpanKind = SpanKind.CLIENT, attributes: Mapping[str, Any] | None = None
) -> Span | None:
    """Like :func:`child_span`, not made current; the caller ends it."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    return tracer().start_span(name, kind=kind, attributes=dict(attributes or {}))


def trace_headers(span: Span | None = None) -> list[tuple[str, bytes]]:
    """The ``traceparent`` (and ``tracestate``) of ``span`` or the current span, as Kafka headers."""
    carrier: dict[str, str] = {}
    ctx = trace.set_span_in_context(span) if span is not None else otel_context.get_current()
    _PROPAGATOR.inject(carrier, context=ctx)
    return [(k, v.encode("ascii")) for k, v in carrier.items()]


def current_trace_id() -> str | None:
    """The current span's trace id (32 hex digits), or None outside a trace."""
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


def mark_error(span: Span | None, exc: BaseException) -> None:
    if span is not None and span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
