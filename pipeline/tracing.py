"""OpenTelemetry spans along one request's way: publish, consume, batch, backend call, segment
write and outcome produce, joined into one trace by the ``traceparent`` the request carries.

Off by default: until :func:`install` or :func:`configure` (with ``tracing.otlp_endpoint``
set) runs in a process, every function here returns at its first line and the awaitables it
is given are handed back untouched, so an untraced worker pays one ``if`` per call site.

How the spans hang together (``docs/tracing.md``):

- ``sluiceway.publish`` (SDK, connectors): a child of the request's own ``trace`` if the caller
  set one, else of the caller's current span; the request leaves carrying the publish span's
  ``traceparent``.
- ``sluiceway.consume``: a child of the publish span, from the record's broker timestamp (the
  time it waited on the topic) to its admission by the worker.
- ``sluiceway.batch``: one per micro-batch, a child of its first traced request and linked to
  every other one (a span has one parent; the links keep the others' traces reachable), with
  ``sluiceway.backend``, ``sluiceway.segment.write`` and ``sluiceway.outcome.produce`` under it.

A malformed or hostile ``traceparent`` is ignored (the spans start a new trace); it never
fails a request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pipeline.kafka.ports import ConsumedMessage
from pipeline.settings import TracingSettings
from schemas.models import InferenceRequest, TraceContext

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

T = TypeVar("T")
Attributes = Mapping[str, str | int | float | bool]

TRACER_NAME = "sluiceway"
PUBLISH = "sluiceway.publish"
CONSUME = "sluiceway.consume"
BATCH = "sluiceway.batch"
BACKEND = "sluiceway.backend"
SEGMENT_WRITE = "sluiceway.segment.write"
OUTCOME_PRODUCE = "sluiceway.outcome.produce"

_PROPAGATOR = TraceContextTextMapPropagator()
_tracer: trace.Tracer | None = None
_owned_provider: TracerProvider | None = None
"""The provider :func:`configure` built (and :func:`shutdown` flushes); not an installed one."""


def enabled() -> bool:
    return _tracer is not None


def install(provider: trace.TracerProvider) -> None:
    """Send Sluiceway's spans to ``provider`` (an application's own, or a test's)."""
    global _tracer
    _tracer = provider.get_tracer(TRACER_NAME)


def configure(settings: TracingSettings, service: str) -> bool:
    """Export this process's spans with OTLP when ``settings`` name an endpoint; return
    whether tracing is on. ``service`` is the ``service.name`` resource attribute."""
    global _owned_provider
    if settings.otlp_endpoint is None:
        return False
    # Imported here: a process that does not trace never loads the SDK.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name or service}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    exporter = OTLPSpanExporter(
        endpoint=settings.otlp_endpoint,
        insecure=settings.otlp_insecure,
        timeout=settings.export_timeout_s,
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    shutdown()
    _owned_provider = provider
    install(provider)
    return True


def shutdown() -> None:
    """Export what is still buffered and turn tracing off in this process."""
    global _tracer, _owned_provider
    _tracer = None
    if _owned_provider is not None:
        _owned_provider.shutdown()
        _owned_provider = None


@contextlib.contextmanager
def configured(settings: TracingSettings, service: str) -> Iterator[bool]:
    """:func:`configure` for the length of a ``with`` block (a process's main function)."""
    try:
        yield configure(settings, service)
    finally:
        shutdown()


def parent_context(carried: TraceContext | None) -> Context | None:
    """The span context a request carries, or ``None`` when it carries none worth using."""
    if carried is None:
        return None
    carrier = {"traceparent": carried.traceparent}
    if carried.tracestate:
        carrier["tracestate"] = carried.tracestate
    context = _PROPAGATOR.extract(carrier)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def _carried(span: trace.Span) -> TraceContext | None:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    if "traceparent" not in carrier:
        return None
    return TraceContext(traceparent=carrier["traceparent"], tracestate=carrier.get("tracestate"))


@contextlib.contextmanager
def publishing(
    requests: Sequence[InferenceRequest], topic_of: Mapping[str, str] | None = None
) -> Iterator[Sequence[InferenceRequest]]:
    """A ``sluiceway.publish`` span per request, open for the ``with`` block (produce until
    acknowledged); yields the requests to send, each carrying its publish span's context.

    ``topic_of`` maps a model to the topic its requests go to (an attribute of the span).
    """
    tracer = _tracer
    if tracer is None:
        yield requests
        return
    spans: list[trace.Span] = []
    sent: list[InferenceRequest] = []
    for request in requests:
        attributes: dict[str, str] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "send",
            "sluiceway.request_id": str(request.request_id),
            "sluiceway.model": request.model,
        }
        if topic_of is not None and request.model in topic_of:
            attributes["messaging.destination.name"] = topic_of[request.model]
        span = tracer.start_span(
            PUBLISH,
            context=parent_context(request.trace),
            kind=SpanKind.PRODUCER,
            attributes=attributes,
        )
        spans.append(span)
        carried = _carried(span)
        sent.append(request if carried is None else request.model_copy(update={"trace": carried}))
    try:
        yield sent
    except BaseException as error:
        for span in spans:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        raise
    finally:
        for span in spans:
            span.end()


def consumed(message: ConsumedMessage, request: InferenceRequest) -> None:
    """Record a ``sluiceway.consume`` span for a request the worker admitted, from the
    record's broker timestamp (when it has one) to now."""
    tracer = _tracer
    if tracer is None:
        return
    kind, appended_ms = message.timestamp()
    start_ns = appended_ms * 1_000_000 if kind != TIMESTAMP_NOT_AVAILABLE else None
    span = tracer.start_span(
        CONSUME,
        context=parent_context(request.trace),
        kind=SpanKind.CONSUMER,
        start_time=start_ns,
        attributes={
            "messaging.system": "kafka",
            "messaging.operation.type": "receive",
            "messaging.destination.name": str(message.topic()),
            "messaging.destination.partition.id": str(message.partition()),
            "messaging.kafka.offset": int(message.offset() or 0),
            "sluiceway.request_id": str(request.request_id),
            "sluiceway.model": request.model,
        },
    )
    span.end()


def traced(
    work: Coroutine[Any, Any, T],
    name: str,
    attributes: Attributes | None = None,
    requests: Iterable[InferenceRequest] = (),
) -> Coroutine[Any, Any, T]:
    """``work`` run inside a span called ``name``; ``work`` itself when tracing is off.

    Without ``requests`` the span is a child of the current one (a backend call inside its
    batch). With them, of the first request that carries a trace, linked to the others'.
    """
    if _tracer is None:
        return work
    context: Context | None = None
    links: list[Link] = []
    for request in requests:
        carried = parent_context(request.trace)
        if carried is None:
            continue
        if context is None:
            context = carried
        else:
            links.append(Link(trace.get_current_span(carried).get_span_context()))
    return _in_span(work, _tracer, name, dict(attributes or {}), context, links)


async def _in_span(
    work: Coroutine[Any, Any, T],
    tracer: trace.Tracer,
    name: str,
    attributes: Attributes,
    context: Context | None,
    links: list[Link],
) -> T:
    # Current for the awaited work, so spans started inside it (in this task) are children.
    with tracer.start_as_current_span(name, context=context, links=links, attributes=attributes):
        return await work
