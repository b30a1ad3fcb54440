"""One request's spans form one trace from the SDK through the real worker and back.

The SDK runs here, its spans kept in memory; the worker runs as its own process and exports
with OTLP/gRPC to a small receiver in this test (the collector's protocol, from the
``opentelemetry-proto`` service definition), read back once the worker stopped and flushed.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pipeline import tracing
from pipeline.client import SluicewayClient
from pipeline.kafka.admin import control_topic_spec, ensure_topics, model_topic_specs
from pipeline.settings import Settings
from pipeline.storage.client import ensure_bucket, make_client
from pipeline.topics import ModelTopics
from schemas.models import ResultStatus
from tests.integration import traffic
from tests.integration.local_ports import free_port
from tests.unit.test_tracing import spans  # noqa: F401 (a fixture: the SDK's spans in memory)


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, Span]] = []
        self._lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next(
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                )
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[str, _Receiver]]:
    receiver = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    server.start()
    yield address, receiver
    server.stop(grace=None)


def test_one_requests_spans_form_one_trace_across_the_sdk_and_the_worker(
    settings: Settings,
    tmp_path: Path,
    collector: tuple[str, _Receiver],
    spans: InMemorySpanExporter,  # noqa: F811 (the fixture imported above)
) -> None:
    address, receiver = collector
    topics = ModelTopics(settings.namespace, "scaler")
    ensure_topics(
        settings.kafka, [control_topic_spec(settings.namespace), *model_topic_specs(topics)]
    )
    ensure_bucket(make_client(settings.object_store), settings.object_store.bucket)
    worker = traffic.start_worker(
        settings, tmp_path / "worker.log", SLUICEWAY_TRACING__OTLP_ENDPOINT=address
    )
    try:
        with SluicewayClient(settings, client_id="tracing-test") as client:
            result = client.infer(traffic.scaler_request(1), timeout_s=60)
        assert result.status is ResultStatus.OK
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, (tmp_path / "worker.log").read_text()[-3000:]

    [publish] = [s for s in spans.get_finished_spans() if s.name == tracing.PUBLISH]
    assert publish.context is not None
    trace_id = publish.context.trace_id.to_bytes(16, "big")
    assert {service for service, _ in receiver.spans} == {"sluiceway-worker"}
    worker_spans = [span for _, span in receiver.spans if span.trace_id == trace_id]
    names = sorted(span.name for span in worker_spans)
    assert names == sorted(
        [
            tracing.CONSUME,
            tracing.BATCH,
            tracing.BACKEND,
            tracing.SEGMENT_WRITE,
            tracing.OUTCOME_PRODUCE,
        ]
    ), sorted(span.name for _, span in receiver.spans)
    in_trace = {span.name: span for span in worker_spans}
    publish_id = publish.context.span_id.to_bytes(8, "big")
    batch_id = in_trace[tracing.BATCH].span_id
    assert in_trace[tracing.CONSUME].parent_span_id == publish_id
    assert in_trace[tracing.BATCH].parent_span_id == publish_id
    for name in (tracing.BACKEND, tracing.SEGMENT_WRITE, tracing.OUTCOME_PRODUCE):
        assert in_trace[name].parent_span_id == batch_id, name
