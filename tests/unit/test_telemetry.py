"""Trace propagation through Kafka headers, and the exporters (no servers: an in-process provider)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentctl.trace import Span, load_spans, tree_lines, turn_trace_ids
from shared.settings import ServiceSettings
from shared.telemetry import (
    JsonLinesSpanExporter,
    child_span,
    consume_span,
    current_trace_id,
    make_exporter,
    trace_headers,
)

MEMORY = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider() -> TracerProvider:
    current = trace.get_tracer_provider()
    if not isinstance(current, TracerProvider):
        current = TracerProvider()
        trace.set_tracer_provider(current)
    current.add_span_processor(SimpleSpanProcessor(MEMORY))
    return current


def test_a_record_without_traceparent_starts_a_trace_and_its_outputs_continue_it() -> None:
    MEMORY.clear()
    with consume_span("ingress.admit", []) as first:
        out = trace_headers()
        trace_id = current_trace_id()
    assert [k for k, _ in out] == ["traceparent"]
    assert trace_id == f"{first.get_span_context().trace_id:032x}"
    # The next service consumes the record carrying those headers.
    with consume_span("reasoning.handle", [*out, ("x-other", b"1")]) as second:
        with child_span("cassandra") as db:
            assert db is not None
        assert current_trace_id() == trace_id
    spans = {s.name: s for s in MEMORY.get_finished_spans()}
    assert spans["reasoning.handle"].parent is not None
    assert spans["reasoning.handle"].parent.span_id == first.get_span_context().span_id
    assert spans["cassandra"].parent is not None
    assert spans["cassandra"].parent.span_id == second.get_span_context().span_id


def test_child_spans_need_a_traced_operation_and_bad_headers_start_fresh() -> None:
    MEMORY.clear()
    with child_span("redis") as nothing:
        assert nothing is None  # a readiness probe makes no root span
    assert current_trace_id() is None
    with consume_span("tool.execute", [("traceparent", b"\xff garbage")]) as span:
        assert span.get_span_context().is_valid
        assert [s.name for s in MEMORY.get_finished_spans()] == []
    assert [s.name for s in MEMORY.get_finished_spans()] == ["tool.execute"]


def test_exporter_choice(tmp_path: Path) -> None:
    settings = ServiceSettings.from_env({}, service_name="reasoning", trace_dir=str(tmp_path))
    otlp = make_exporter(settings, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert type(otlp).__name__ == "OTLPSpanExporter"
    assert otlp is not None
    otlp.shutdown()
    local = make_exporter(settings, {})
    assert isinstance(local, JsonLinesSpanExporter) and local.path.parent == tmp_path
    local.shutdown()
    assert make_exporter(ServiceSettings.from_env({}, trace_dir=""), {}) is None


def test_json_lines_round_trip_to_agentctl_trace(tmp_path: Path) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "reasoning"}))
    exporter = JsonLinesSpanExporter(tmp_path / "svc.jsonl", "reasoning")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    record = {"agentbus.record": "TurnRequested"}
    with (
        tracer.start_as_current_span("reasoning.handle", attributes=record),
        tracer.start_as_current_span("triton.infer", attributes={"model": "reference_policy"}),
    ):
        pass
    with tracer.start_as_current_span("elsewhere"):
        pass
    provider.shutdown()
    lines = [json.loads(line) for line in (tmp_path / "svc.jsonl").read_text().splitlines()]
    handle = next(line for line in lines if line["name"] == "reasoning.handle")
    spans = load_spans(tmp_path, [handle["trace_id"]])
    assert sorted(s.name for s in spans) == ["reasoning.handle", "triton.infer"]
    text = "\n".join(tree_lines(spans))
    assert "[reasoning] reasoning.handle  record=TurnRequested" in text
    assert "  [reasoning] triton.infer  model=reference_policy" in text  # indented under its parent
    events = [
        {"turn_id": "t1", "trace_id": "a" * 32},
        {"turn_id": "t2", "trace_id": "b" * 32},
        {"turn_id": "t2", "trace_id": "b" * 32},
    ]
    assert turn_trace_ids(events, None) == ("t2", ["b" * 32])
    assert turn_trace_ids(events, "t1") == ("t1", ["a" * 32])
    assert turn_trace_ids([], None) == (None, [])
    assert isinstance(spans[0], Span)
