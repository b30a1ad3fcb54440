"""Hypothesis strategies for every event model, and checks that they stay valid.

Hand-written rather than ``st.builds``: the models have cross-field rules (exactly one input
shape, tensor bytes matching the shape, error code iff not ok) that blind generation would
almost never satisfy. Other schema tests import ``events`` and ``EVENT_STRATEGIES``.
"""

from __future__ import annotations

import math
import string
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import models as m

SETTINGS = settings(max_examples=200, deadline=None)

names = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=24)
texts = st.text(max_size=40)
opt = st.none().__or__
int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
counts = st.integers(0, 2**63 - 1)
finite = st.floats(allow_nan=False)
nonneg = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
timestamps = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
).map(lambda d: d.replace(microsecond=d.microsecond - d.microsecond % 1000))
scalars = st.one_of(st.booleans(), int64, finite, texts)
features = st.dictionaries(names, st.one_of(st.none(), scalars), max_size=8)
attributes = st.dictionaries(st.text(max_size=10), texts, max_size=4)
traces = st.builds(m.TraceContext, traceparent=names, tracestate=opt(texts))


@st.composite
def tensors(draw: st.DrawFn) -> m.Tensor:
    datatype = draw(st.sampled_from(list(m.TensorDatatype)))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    count = math.prod(shape)
    if datatype is m.TensorDatatype.BYTES:
        elements = draw(st.lists(st.binary(max_size=6), min_size=count, max_size=count))
        data = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
    else:
        size = count * m.ITEMSIZE[datatype]
        data = draw(st.binary(min_size=size, max_size=size))
    return m.Tensor(name=draw(names), datatype=datatype, shape=shape, data=data)


params = st.builds(
    m.GenerationParams,
    max_tokens=opt(st.integers(1, 4096)),
    temperature=opt(st.floats(0, 2)),
    top_p=opt(st.floats(0.01, 1)),
    stop=opt(st.lists(texts, max_size=3)),
    seed=opt(int64),
    logprobs=opt(st.integers(0, 20)),
)
messages = st.builds(
    m.ChatMessage, role=st.sampled_from(list(m.ChatRole)), content=texts, name=opt(names)
)
text_inputs = st.one_of(
    st.builds(m.TextInput, prompt=texts, params=opt(params)),
    st.builds(m.TextInput, messages=st.lists(messages, min_size=1, max_size=3), params=opt(params)),
)
inputs = st.one_of(
    st.builds(m.Inputs, tensors=st.lists(tensors(), min_size=1, max_size=3)),
    st.builds(m.Inputs, features=features),
    st.builds(m.Inputs, text=text_inputs),
)
text_outputs = st.builds(
    m.TextOutput,
    text=texts,
    finish_reason=opt(names),
    prompt_tokens=opt(st.integers(0, 10_000)),
    completion_tokens=opt(st.integers(0, 10_000)),
)
outputs = st.one_of(
    st.builds(m.Outputs, tensors=st.lists(tensors(), min_size=1, max_size=2)),
    st.builds(m.Outputs, features=features),
    st.builds(m.Outputs, text=text_outputs),
)
object_refs = st.builds(m.ObjectRef, bucket=names, key=names, etag=opt(names))

requests = st.builds(
    m.InferenceRequest,
    request_id=st.uuids(),
    model=names,
    model_version=opt(names),
    inputs=inputs,
    reply_to=opt(names),
    correlation_id=opt(names),
    tenant=opt(names),
    priority=opt(st.integers(0, 9)),
    deadline=opt(timestamps),
    explain=st.booleans(),
    source=opt(st.builds(m.Source, system=names, entity_type=names, entity_id=names)),
    batch_job_id=opt(names),
    custom_id=opt(names),
    attributes=attributes,
    trace=opt(traces),
)


@st.composite
def results(draw: st.DrawFn) -> m.InferenceResult:
    status = draw(st.sampled_from(list(m.ResultStatus)))
    return m.InferenceResult(
        request_id=draw(st.uuids()),
        correlation_id=draw(opt(names)),
        status=status,
        error_code=None if status is m.ResultStatus.OK else draw(names),
        error_message=draw(opt(texts)),
        model=draw(names),
        model_version=draw(opt(names)),
        outputs=draw(opt(outputs)),
        explanation=draw(
            opt(
                st.builds(
                    m.ExplanationSummary,
                    method=names,
                    base_value=opt(finite),
                    attributions=opt(
                        st.lists(st.builds(m.Attribution, feature=names, value=finite), max_size=3)
                    ),
                    token_logprobs=opt(
                        st.lists(st.builds(m.TokenLogprob, token=texts, logprob=finite), max_size=3)
                    ),
                )
            )
        ),
        payload_ref=draw(
            opt(
                st.builds(
                    m.SegmentRef,
                    bucket=names,
                    key=names,
                    etag=opt(names),
                    offset=counts,
                    length=st.integers(1, 2**40),
                )
            )
        ),
        timings=draw(
            opt(
                st.builds(
                    m.Timings, queued_ms=opt(nonneg), backend_ms=opt(nonneg), total_ms=opt(nonneg)
                )
            )
        ),
        worker_id=draw(opt(names)),
        batch_job_id=draw(opt(names)),
        custom_id=draw(opt(names)),
        trace=draw(opt(traces)),
    )


@st.composite
def dead_letters(draw: st.DrawFn) -> m.DeadLetter:
    first = draw(timestamps)
    return m.DeadLetter(
        original_topic=draw(names),
        original_partition=draw(st.integers(0, 2**31 - 1)),
        original_offset=draw(counts),
        original_key=draw(opt(st.binary(max_size=16))),
        original_value=draw(opt(st.binary(max_size=64))),
        original_headers=draw(
            opt(
                st.lists(
                    st.builds(m.Header, key=texts, value=opt(st.binary(max_size=8))), max_size=3
                )
            )
        ),
        original_timestamp=draw(opt(timestamps)),
        error_class=draw(names),
        reason_code=draw(names),
        reason_message=draw(texts),
        attempts=draw(st.integers(0, 100)),
        first_failure_at=first,
        last_failure_at=first + timedelta(milliseconds=draw(st.integers(0, 10**9))),
        request_id=draw(opt(names)),
        model=draw(opt(names)),
        worker_id=draw(opt(names)),
    )


@st.composite
def drift_reports(draw: st.DrawFn) -> m.DriftReport:
    start = draw(timestamps)
    return m.DriftReport(
        report_id=draw(st.uuids()),
        model=draw(names),
        model_version=draw(names),
        baseline_version=draw(opt(names)),
        window_start=start,
        window_end=start + timedelta(seconds=draw(st.integers(0, 86_400))),
        window_count=draw(counts),
        consecutive_breaches=draw(st.integers(0, 1000)),
        metrics=draw(
            st.lists(
                st.builds(
                    m.DriftMetric,
                    name=names,
                    feature=opt(names),
                    value=finite,
                    threshold=opt(finite),
                    breached=st.booleans(),
                ),
                max_size=4,
            )
        ),
        severity=draw(st.sampled_from(list(m.DriftSeverity))),
        decision=draw(st.sampled_from(list(m.DriftDecision))),
        explanation=draw(texts),
        report_ref=draw(opt(object_refs)),
        created_at=draw(timestamps),
        trace=draw(opt(traces)),
    )


@st.composite
def control_events(draw: st.DrawFn) -> m.ControlEvent:
    action = draw(st.sampled_from(list(m.ControlAction)))
    split = None
    if action is m.ControlAction.CANARY:
        weights = draw(st.lists(st.floats(0.01, 100), min_size=1, max_size=3))
        split = [m.TrafficSplit(version=draw(names), weight=w) for w in weights]
    return m.ControlEvent(
        event_id=draw(st.uuids()),
        model=draw(names),
        action=action,
        from_version=draw(opt(names)),
        to_version=draw(names) if action is not m.ControlAction.CANARY else draw(opt(names)),
        split=split,
        reason=draw(texts),
        report_id=draw(opt(st.uuids())),
        report_ref=draw(opt(object_refs)),
        issued_at=draw(timestamps),
        issued_by=draw(opt(names)),
        trace=draw(opt(traces)),
    )


feedback = st.builds(
    m.Feedback,
    request_id=st.uuids(),
    model=names,
    model_version=opt(names),
    label=scalars,
    observed_at=timestamps,
    source=opt(names),
    tenant=opt(names),
    correlation_id=opt(names),
    attributes=attributes,
)
batch_jobs = st.builds(
    m.BatchJob,
    job_id=names,
    model=names,
    model_version=opt(names),
    status=st.sampled_from(list(m.BatchJobStatus)),
    input_uri=names,
    input_format=st.sampled_from(list(m.BatchInputFormat)),
    output_uri=opt(names),
    error_uri=opt(names),
    manifest_uri=opt(names),
    counts=st.builds(m.BatchCounts, total=counts, completed=counts, failed=counts),
    created_at=timestamps,
    started_at=opt(timestamps),
    finalizing_at=opt(timestamps),
    finished_at=opt(timestamps),
    expires_at=opt(timestamps),
    error_code=opt(names),
    error_message=opt(texts),
    tenant=opt(names),
    attributes=attributes,
)
invalidations = st.builds(
    m.Invalidation,
    event_id=st.uuids(),
    model=names,
    entity_key=names,
    kind=st.sampled_from(list(m.InvalidationKind)),
    source_system=opt(names),
    source_event_id=opt(names),
    occurred_at=timestamps,
    connector=names,
    reason=opt(texts),
)

EVENT_STRATEGIES: dict[type[m.Event], st.SearchStrategy[Any]] = {
    m.InferenceRequest: requests,
    m.InferenceResult: results(),
    m.DeadLetter: dead_letters(),
    m.DriftReport: drift_reports(),
    m.ControlEvent: control_events(),
    m.Feedback: feedback,
    m.BatchJob: batch_jobs,
    m.Invalidation: invalidations,
}
events: st.SearchStrategy[m.Event] = st.one_of(*EVENT_STRATEGIES.values())


def test_every_event_model_has_a_strategy() -> None:
    assert set(EVENT_STRATEGIES) == set(m.EVENT_MODELS.values())


@SETTINGS
@given(events)
def test_strategies_produce_models_that_revalidate_unchanged(event: m.Event) -> None:
    again = type(event).model_validate(event.model_dump())
    assert again == event
