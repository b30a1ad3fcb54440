from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pipeline import tracing
from pipeline.settings import TracingSettings
from schemas.models import InferenceRequest, Inputs, TraceContext

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_PARENT = "00f067aa0ba902b7"


def _request(trace: TraceContext | None = None) -> InferenceRequest:
    return InferenceRequest(
        request_id=uuid.uuid4(), model="m", inputs=Inputs(features={"a": 1.0}), trace=trace
    )


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.shutdown()


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


async def _answer() -> int:
    return 42


def test_when_off_everything_is_handed_back_untouched() -> None:
    tracing.shutdown()
    assert not tracing.enabled()
    work = _answer()
    assert tracing.traced(work, tracing.BATCH) is work
    assert asyncio.run(work) == 42
    requests = [_request()]
    with tracing.publishing(requests) as sent:
        assert sent is requests
    assert requests[0].trace is None


def test_nothing_configured_means_off() -> None:
    assert tracing.configure(TracingSettings(), "test") is False
    assert not tracing.enabled()


def test_an_otlp_endpoint_turns_tracing_on_until_shutdown() -> None:
    with tracing.configured(TracingSettings(otlp_endpoint="127.0.0.1:1"), "test") as on:
        assert on
        assert tracing.enabled()
    assert not tracing.enabled()


def test_a_published_request_carries_its_publish_span(spans: InMemorySpanExporter) -> None:
    with tracing.publishing([_request()], {"m": "ns.m.requests"}) as sent:
        pass
    [publish] = _named(spans, tracing.PUBLISH)
    assert publish.context is not None
    assert publish.parent is None
    carried = sent[0].trace
    assert carried is not None
    assert carried.traceparent.startswith(
        f"00-{publish.context.trace_id:032x}-{publish.context.span_id:016x}-"
    )
    assert publish.attributes is not None
    assert publish.attributes["messaging.destination.name"] == "ns.m.requests"


def test_a_callers_own_trace_is_continued(spans: InMemorySpanExporter) -> None:
    caller = TraceContext(traceparent=f"00-{CALLER_TRACE}-{CALLER_PARENT}-01")
    with tracing.publishing([_request(caller)]) as sent:
        pass
    [publish] = _named(spans, tracing.PUBLISH)
    assert publish.context is not None
    assert publish.parent is not None
    assert f"{publish.context.trace_id:032x}" == CALLER_TRACE
    assert f"{publish.parent.span_id:016x}" == CALLER_PARENT
    assert sent[0].trace is not None
    assert CALLER_TRACE in sent[0].trace.traceparent


def test_a_failed_publish_marks_its_spans(spans: InMemorySpanExporter) -> None:
    with pytest.raises(RuntimeError), tracing.publishing([_request()]):
        raise RuntimeError("broker gone")
    [publish] = _named(spans, tracing.PUBLISH)
    assert not publish.status.is_ok


def test_a_batch_is_a_child_of_its_first_request_and_links_the_others(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.publishing([_request(), _request(), _request()]) as sent:
        pass
    publishes = {
        span.context.span_id: span for span in _named(spans, tracing.PUBLISH) if span.context
    }

    async def batch() -> None:
        await tracing.traced(_answer(), tracing.BACKEND)

    asyncio.run(tracing.traced(batch(), tracing.BATCH, {"sluiceway.records": 3}, sent))
    [batch_span] = _named(spans, tracing.BATCH)
    [backend] = _named(spans, tracing.BACKEND)
    assert batch_span.parent is not None
    assert batch_span.context is not None
    first = publishes[batch_span.parent.span_id]
    assert first.context is not None
    assert batch_span.context.trace_id == first.context.trace_id
    linked = {link.context.span_id for link in batch_span.links}
    assert linked | {batch_span.parent.span_id} == set(publishes)
    assert backend.parent is not None
    assert backend.parent.span_id == batch_span.context.span_id


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage",
        "00-" + "0" * 32 + "-" + "0" * 16 + "-01",  # all-zero ids are invalid
        "ff-" + CALLER_TRACE + "-" + CALLER_PARENT + "-01",  # version ff is forbidden
        "00-" + "z" * 32 + "-" + CALLER_PARENT + "-01",
        "00-" + CALLER_TRACE + "-" + CALLER_PARENT + "-01-" + "x" * 150,  # 00 has no tail
        "00-" + CALLER_TRACE + "-" + CALLER_PARENT,
    ],
)
def test_a_hostile_traceparent_starts_a_new_trace_and_fails_nothing(
    spans: InMemorySpanExporter, traceparent: str
) -> None:
    hostile = TraceContext(traceparent=traceparent, tracestate="=,=;" * 40)
    assert tracing.parent_context(hostile) is None
    with tracing.publishing([_request(hostile)]) as sent:
        pass
    asyncio.run(tracing.traced(_answer(), tracing.BATCH, requests=sent))
    [publish] = _named(spans, tracing.PUBLISH)
    [batch_span] = _named(spans, tracing.BATCH)
    assert publish.context is not None
    assert batch_span.context is not None
    assert batch_span.context.trace_id == publish.context.trace_id
    assert f"{publish.context.trace_id:032x}" != CALLER_TRACE


def test_a_valid_traceparent_with_a_hostile_tracestate_is_still_followed() -> None:
    carried = TraceContext(
        traceparent=f"00-{CALLER_TRACE}-{CALLER_PARENT}-01", tracestate="=,=;" * 40
    )
    assert tracing.parent_context(carried) is not None
