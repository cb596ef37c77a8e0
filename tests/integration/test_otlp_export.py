"""OTLP export for real: spans of a service reach an OTLP/gRPC receiver (the collector's protocol)."""

from __future__ import annotations

import asyncio
import socket
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from shared.settings import ServiceSettings
from shared.telemetry import make_exporter


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.requests: list[Any] = []

    def Export(self, request: Any, context: Any) -> Any:  # the protocol names it so
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_reach_an_otlp_receiver_when_the_endpoint_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        exporter = make_exporter(
            ServiceSettings.from_env({}, service_name="reasoning"), {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
        )
        assert exporter is not None
        provider = TracerProvider(resource=Resource.create({"service.name": "reasoning"}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        with provider.get_tracer("test").start_as_current_span("reasoning.handle", attributes={"a": 1}):
            pass
        await asyncio.to_thread(provider.shutdown)
    finally:
        server.stop(0)
    spans = [
        (rs.resource, span)
        for request in receiver.requests
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    assert [s.name for _, s in spans] == ["reasoning.handle"]
    resource = {kv.key: kv.value.string_value for kv in spans[0][0].attributes}
    assert resource["service.name"] == "reasoning"
