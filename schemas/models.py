"""Pydantic models that mirror the Avro schemas in ``schemas/avro`` one to one.

Contract: every record of every ``.avsc`` file has a model class of the same (short) name
with exactly the same field names, and every Avro enum has a :class:`~enum.StrEnum` of the
same name with the same symbols. ``tests/unit/test_schemas_models.py`` proves that, and
that every valid model instance round-trips through its schema unchanged.

The models add what Avro cannot say: size limits (:data:`schemas.limits.DEFAULT_LIMITS`),
ranges (Avro ``int`` is 32-bit, ``long`` 64-bit), one-of rules (exactly one input shape),
and timestamps that are timezone-aware and whole milliseconds (what ``timestamp-millis``
can carry), so a validated model always encodes, and decodes back equal.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, ClassVar, Self
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    model_validator,
)

from schemas.limits import DEFAULT_LIMITS as _L

NAMESPACE = "io.sluiceway.v1"

_INT32 = 2**31
_INT64 = 2**63


def _whole_millis_utc(value: datetime) -> datetime:
    """Normalise to UTC and drop sub-millisecond precision (``timestamp-millis`` keeps ms)."""
    try:
        value = value.astimezone(UTC)
    except OverflowError as exc:  # e.g. 0001-01-01 at +05:00 has no UTC representation
        raise ValueError("timestamp out of range in UTC") from exc
    return value.replace(microsecond=value.microsecond - value.microsecond % 1000)


def _not_an_int(value: object) -> object:
    # Strict float still accepts an int (and turns 2**64 into 1.8e19); an int that reaches
    # the double branch of a scalar did not fit a long, so it is refused, not rounded.
    if isinstance(value, int):
        raise ValueError("integer outside the 64-bit long range")
    return value


# Identifiers: ids, names, versions, topics, map keys. Non-empty where the contract says so.
Name = Annotated[str, StringConstraints(min_length=1, max_length=_L.max_name_length)]
Key = Annotated[str, StringConstraints(max_length=_L.max_name_length)]
Text = Annotated[str, StringConstraints(max_length=_L.max_string_length)]
Int32 = Annotated[int, Field(ge=-_INT32, le=_INT32 - 1)]
Int64 = Annotated[int, Field(ge=-_INT64, le=_INT64 - 1)]
Count = Annotated[int, Field(ge=0, le=_INT64 - 1)]
Timestamp = Annotated[AwareDatetime, AfterValidator(_whole_millis_utc)]
Attributes = Annotated[dict[Key, Text], Field(max_length=_L.max_map_entries)]

# A scalar feature or label. Strict, so that Avro's branch survives a round trip: 1 stays a
# long, 1.0 a double, True a boolean (lax mode would turn an oversized int into a float).
Scalar = (
    StrictBool
    | Annotated[StrictInt, Field(ge=-_INT64, le=_INT64 - 1)]
    | Annotated[StrictFloat, BeforeValidator(_not_an_int)]
    | Annotated[StrictStr, StringConstraints(max_length=_L.max_string_length)]
)
FeatureValue = Scalar | None
Features = Annotated[dict[Name, FeatureValue], Field(max_length=_L.max_map_entries)]


def _items(n: int = _L.max_array_items) -> dict[str, int]:
    return {"max_length": n}


class AvroRecord(BaseModel):
    """Base of every model: immutable, no unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Event(AvroRecord):
    """A top-level event: one Avro schema file, one Kafka message value."""

    AVRO_NAME: ClassVar[str]
    """Full Avro name of the schema, e.g. ``io.sluiceway.v1.InferenceRequest``."""


# ----------------------------------------------------------------------------- enums


class TensorDatatype(StrEnum):
    BOOL = "BOOL"
    UINT8 = "UINT8"
    UINT16 = "UINT16"
    UINT32 = "UINT32"
    UINT64 = "UINT64"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    FP32 = "FP32"
    FP64 = "FP64"
    BF16 = "BF16"
    BYTES = "BYTES"


ITEMSIZE: dict[TensorDatatype, int] = {
    TensorDatatype.BOOL: 1,
    TensorDatatype.UINT8: 1,
    TensorDatatype.UINT16: 2,
    TensorDatatype.UINT32: 4,
    TensorDatatype.UINT64: 8,
    TensorDatatype.INT8: 1,
    TensorDatatype.INT16: 2,
    TensorDatatype.INT32: 4,
    TensorDatatype.INT64: 8,
    TensorDatatype.FP16: 2,
    TensorDatatype.FP32: 4,
    TensorDatatype.FP64: 8,
    TensorDatatype.BF16: 2,
}
"""Bytes per element of the fixed-size types (BYTES elements are length-prefixed)."""


class ChatRole(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class ResultStatus(StrEnum):
    OK = "ok"
    ERROR = "error"
    EXPIRED = "expired"
    REJECTED = "rejected"


class DriftSeverity(StrEnum):
    OK = "ok"
    WARNING = "warning"
    CRITICAL = "critical"


class DriftDecision(StrEnum):
    NONE = "none"
    ALERT = "alert"
    ROLLBACK = "rollback"


class ControlAction(StrEnum):
    ROLLBACK = "rollback"
    PROMOTE = "promote"
    CANARY = "canary"
    PIN = "pin"


class BatchJobStatus(StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class InvalidationKind(StrEnum):
    """What happened to a source record whose predictions no longer count."""

    DELETED = "deleted"
    CANCELLED = "cancelled"


class BatchInputFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"
    AVRO = "avro"


# ----------------------------------------------------------------------------- shared records


class TraceContext(AvroRecord):
    traceparent: Annotated[str, StringConstraints(min_length=1, max_length=_L.max_name_length)]
    tracestate: Annotated[str, StringConstraints(max_length=_L.max_name_length * 2)] | None = None


class Tensor(AvroRecord):
    """One KServe v2 tensor; ``data`` length must agree with ``shape`` and ``datatype``."""

    name: Name
    datatype: TensorDatatype
    shape: Annotated[
        list[Annotated[int, Field(ge=0, le=_INT64 - 1)]], Field(**_items(_L.max_tensor_dims))
    ]
    data: Annotated[bytes, Field(max_length=_L.max_tensor_bytes)]

    @model_validator(mode="after")
    def _data_matches_shape(self) -> Self:
        elements = math.prod(self.shape)
        itemsize = ITEMSIZE.get(self.datatype)
        if itemsize is not None:
            if elements * itemsize != len(self.data):
                raise ValueError(
                    f"tensor {self.name!r}: shape {self.shape} of {self.datatype} needs "
                    f"{elements * itemsize} bytes, got {len(self.data)}"
                )
            return self
        # BYTES: each element is a 4-byte little-endian length, then that many bytes.
        data, pos, count = self.data, 0, 0
        while pos < len(data):
            if pos + 4 > len(data):
                raise ValueError(f"tensor {self.name!r}: BYTES element header truncated")
            pos += 4 + int.from_bytes(data[pos : pos + 4], "little")
            count += 1
        if pos != len(data) or count != elements:
            raise ValueError(
                f"tensor {self.name!r}: BYTES data holds {count} elements, shape needs {elements}"
            )
        return self


def _one_of(model: BaseModel, names: tuple[str, ...]) -> None:
    given = [name for name in names if getattr(model, name) is not None]
    if len(given) != 1:
        raise ValueError(f"exactly one of {', '.join(names)} must be set, got {given or 'none'}")


def _total_tensor_bytes(tensors: list[Tensor] | None) -> None:
    if tensors is not None and sum(len(t.data) for t in tensors) > _L.max_tensor_bytes:
        raise ValueError(f"tensors hold more than {_L.max_tensor_bytes} bytes together")


class ChatMessage(AvroRecord):
    role: ChatRole
    content: Text
    name: Name | None = None


class GenerationParams(AvroRecord):
    max_tokens: Annotated[int, Field(ge=1, le=_INT32 - 1)] | None = None
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: Annotated[list[Text], Field(max_length=16)] | None = None
    seed: Int64 | None = None
    logprobs: Annotated[int, Field(ge=0, le=100)] | None = None


class TextInput(AvroRecord):
    """A prompt or a chat, exactly one of them."""

    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, **_items())] | None = None
    params: GenerationParams | None = None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> Self:
        _one_of(self, ("prompt", "messages"))
        return self


class Inputs(AvroRecord):
    """Exactly one input shape: named tensors, a feature record, or text."""

    tensors: Annotated[list[Tensor], Field(min_length=1, **_items())] | None = None
    features: Features | None = None
    text: TextInput | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        _one_of(self, ("tensors", "features", "text"))
        _total_tensor_bytes(self.tensors)
        return self


class TextOutput(AvroRecord):
    text: Text
    finish_reason: Name | None = None
    prompt_tokens: Annotated[int, Field(ge=0, le=_INT32 - 1)] | None = None
    completion_tokens: Annotated[int, Field(ge=0, le=_INT32 - 1)] | None = None


class Outputs(AvroRecord):
    """Exactly one output shape, the same three as :class:`Inputs`."""

    tensors: Annotated[list[Tensor], Field(min_length=1, **_items())] | None = None
    features: Features | None = None
    text: TextOutput | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        _one_of(self, ("tensors", "features", "text"))
        _total_tensor_bytes(self.tensors)
        return self


class Source(AvroRecord):
    system: Name
    entity_type: Name
    entity_id: Name


class Attribution(AvroRecord):
    feature: Name
    value: float


class TokenLogprob(AvroRecord):
    token: Text
    logprob: float


class ExplanationSummary(AvroRecord):
    method: Name
    base_value: float | None = None
    attributions: Annotated[list[Attribution], Field(**_items())] | None = None
    token_logprobs: Annotated[list[TokenLogprob], Field(**_items())] | None = None


class SegmentRef(AvroRecord):
    """A byte range of a segment object: fetch it with one ranged GET."""

    bucket: Name
    key: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    etag: Name | None = None
    offset: Count
    length: Annotated[int, Field(ge=1, le=_INT64 - 1)]

    @property
    def uri(self) -> str:
        """``s3://bucket/key`` of the segment."""
        return f"s3://{self.bucket}/{self.key}"

    @property
    def http_range(self) -> str:
        """The HTTP ``Range`` header value that fetches just this record."""
        return f"bytes={self.offset}-{self.offset + self.length - 1}"


class ObjectRef(AvroRecord):
    bucket: Name
    key: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    etag: Name | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class Timings(AvroRecord):
    queued_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    backend_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    total_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class Header(AvroRecord):
    key: Annotated[str, StringConstraints(max_length=_L.max_name_length)]
    value: bytes | None = None


class DriftMetric(AvroRecord):
    name: Name
    feature: Name | None = None
    value: float
    threshold: float | None = None
    breached: bool


class TrafficSplit(AvroRecord):
    version: Name
    weight: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class BatchCounts(AvroRecord):
    total: Count = 0
    completed: Count = 0
    failed: Count = 0


# ----------------------------------------------------------------------------- events


class InferenceRequest(Event):
    """A request for one prediction (topic ``<ns>.<model>.requests``, key = entity id)."""

    AVRO_NAME: ClassVar[str] = f"{NAMESPACE}.InferenceRequest"

    request_id: UUID
    model: Name
    model_version: Name | None = None
    inputs: Inputs
    reply_to: Name | None = None
    correlation_id: Name | None = None
    tenant: Name | None = None
    priority: Annotated[int, Field(ge=0, le=9)] | None = None
    deadline: Timestamp | None = None
    explain: bool = False
    source: Source | None = None
    batch_job_id: Name | None = None
    custom_id: Name | None = None
    attributes: Attributes = Field(default_factory=dict)
    trace: TraceContext | None = None


class InferenceResult(Event):
    """The outcome of one request (``<ns>.<model>.results`` and ``reply_to``)."""

    AVRO_NAME: ClassVar[str] = f"{NAMESPACE}.InferenceResult"

    request_id: UUID
    correlation_id: Name | None = None
    status: ResultStatus
    error_code: Name | None = None
    error_message: Text | None = None
    model: Name
    model_version: Name | None = None
    outputs: Outputs | None = None
    explanation: ExplanationSummary | None = None
    payload_ref: SegmentRef | None = None
    timings: Timings | None = None
    worker_id: Name | None = None
    batch_job_id: Name | None = None
    custom_id: Name | None = None
    trace: TraceContext | None = None
    input_features: Features | None = None
    """The request's feature record, echoed for the drift monitor (``models.<m>.echo_features``)."""

    @model_validator(mode="after")
    def _error_code_iff_not_ok(self) -> Self:
        if (self.status is ResultStatus.OK) != (self.error_code is None):
            raise ValueError("error_code is required unless status is ok, and only then")
        return self


class DeadLetter(Event):
    """A poison message with its original bytes and the stable reason (``<ns>.<model>.dlq``)."""

    AVRO_NAME: ClassVar[str] = f"{NAMESPACE}.DeadLetter"

    original_topic: Name
    original_partition: Annotated[int, Field(ge=0, le=_INT32 - 1)]
    original_offset: Count
    original_key: bytes | None = None
    original_value: bytes | None = None
    original_headers: Annotated[list[Header], Field(**_items())] | None = None
    original_timestamp: Timestamp | None = None
    error_class: Name
    reason_code: Name
    reason_message: Text
    attempts: Annotated[int, Field(ge=0, le=_INT32 - 1)]
    first_failure_at: Timestamp
    last_failure_at: Timestamp
    request_id: Name | None = None
    model: Name | None = None
    worker_id: Name | None = None
    original_ref: Text | None = None
    dropped_headers: Annotated[list[Key], Field(**_items())] | None = None

    @model_validator(mode="after")
    def _ordered_failures(self) -> Self:
        if self.last_failure_at < self.first_failure_at:
            raise ValueError("last_failure_at is before first_failure_at")
        return self


class DriftReport(Event):
    """Windowed statistics of one model version and the decision taken (``<ns>.drift``)."""

    AVRO_NAME: ClassVar[str] = f"{NAMESPACE}.DriftReport"

    report_id: UUID
    model: Name
    model_version: Name
    baseline_version: Name | None = None
    window_start: Timestamp
    window_end: Timestamp
    window_count: Count
    consecutive_breaches: Annotated[int, Field(ge=0, le=_INT32 - 1)]
    metrics: Annotated[list[DriftMetric], Field(**_items())]
    severity: DriftSeverity
    decision: DriftDecision
    explanation: Text
    report_ref: ObjectRef | None = None
    created_at: Timestamp
    trace: TraceContext | None = None

    @model_validator(mode="after")
    def _ordered_window(self) -> Self:
        if self.window_end < self.window_start:
            raise ValueError("window_end is before window_start")
        return self


class ControlEvent(Event):
    """A routing decision for one model (``<ns>.control``, compacted, key = model)."""

    AVRO_NAME: ClassVar[str] = f"{NAMESPACE}.ControlEvent"

    event_id: UUID
    model: Name
    action: ControlAction
    from_version: Name | None = None
    to_version: Name | None = None
    split: Annotated[list[TrafficSplit], Field(max_length=64)] | None = None
    reason: Text
    report_id: UUID | None = None
    report_ref: ObjectRef | None = None
    issued_at: Timestamp
    issued_by: Name | None = None
    trace: TraceContext | None = None
    idempotency_key: Name | None = None
    """Followers fold a repeated key as a no-op (``RoutingTable.apply``)."""

    @model_validator(mode="after")
    def _action_arguments(self) -> Self:
        if self.action is ControlAction.CANARY:
            if not self.split or sum(s.weight for s in self.split) <= 0:
                raise ValueError("a canary needs a split with a positive total weight")
        elif self.to_version is None:
            raise ValueError(f"{self.action.value} needs to_version")
        return self


class Feedback(Event):
    """Ground truth for an earlier request (``<ns>.feedback``)."""

    AVRO_NAME: ClassVar[str] = f"{NAMESPACE}.Feedback"

    request_id: UUID
    model: Name
    model_version: Name | None = None
    label: Scalar
    observed_at: Timestamp
    source: Name | None = None
    tenant: Name | None = None
    correlation_id: Name | None = None
    attributes: Attributes = Field(default_factory=dict)


class BatchJob(Event):
    """Manifest and status of a bulk batch job."""

    AVRO_NAME: ClassVar[str] = f"{NAMESPACE}.BatchJob"

    job_id: Name
    model: Name
    model_version: Name | None = None
    status: BatchJobStatus
    input_uri: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    input_format: BatchInputFormat
    output_uri: Annotated[str, StringConstraints(max_length=4096)] | None = None
    error_uri: Annotated[str, StringConstraints(max_length=4096)] | None = None
    manifest_uri: Annotated[str, StringConstraints(max_length=4096)] | None = None
    counts: BatchCounts = Field(default_factory=BatchCounts)
    created_at: Timestamp
    started_at: Timestamp | None = None
    finalizing_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    expires_at: Timestamp | None = None
    error_code: Name | None = None
    error_message: Text | None = None
    tenant: Name | None = None
    attributes: Attributes = Field(default_factory=dict)


EntityKey = Name
"""An entity's Kafka message key: what a connector gives the requests of the entity
(``Source.entity_id``), so an invalidation lands on the same key of a compacted topic."""


class Invalidation(Event):
    """A source record was deleted or cancelled: earlier predictions for its entity are stale.

    Topic ``<ns>.<model>.invalidations`` (compacted, key = ``entity_key``): the latest word
    on each entity is kept, so a reader that starts late still sees every entity withdrawn.
    """

    AVRO_NAME: ClassVar[str] = f"{NAMESPACE}.Invalidation"

    event_id: UUID
    model: Name
    entity_key: EntityKey
    kind: InvalidationKind
    source_system: Name | None = None
    source_event_id: Name | None = None
    occurred_at: Timestamp
    connector: Name
    reason: Text | None = None


EVENT_MODELS: dict[str, type[Event]] = {
    model.AVRO_NAME: model
    for model in (
        InferenceRequest,
        InferenceResult,
        DeadLetter,
        DriftReport,
        ControlEvent,
        Feedback,
        BatchJob,
        Invalidation,
    )
}
"""Every event model by full Avro name."""
