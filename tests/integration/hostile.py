"""A catalogue of hostile Kafka records for the inference worker, each with its expected outcome.

Every builder takes a :class:`Context` (namespace, reply topic, seeded RNG) and returns the
records of one occurrence of its kind (usually one; a few kinds need neighbours), each with
the key, value and headers to produce, the requests topic's model, and an :class:`Expect`:
what the hardened worker must answer (see docs/worker.md and docs/contracts.md):

- undecodable records: one ``DeadLetter`` on ``<ns>.<model>.dlq`` with one of ``reasons``;
- decodable but invalid input: one ``DeadLetter`` naming the request id, and, when the request
  carried an allowed ``reply_to``, one ``rejected`` reply whose ``error_code`` is the reason;
- forged ``reply_to`` (anything but ``<ns>.replies.*``): one ``rejected`` result with
  ``reply_to_not_allowed``, and nothing on the forged topic;
- a pinned version that is unknown or malformed: one ``rejected`` result, ``unknown_version``;
- hostile keys and headers on an otherwise good request: served ``ok``;
- a past deadline: ``expired``.
"""

from __future__ import annotations

import math
import random
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import cache

import numpy as np

import schemas
from devkit.modeling.invoices import FEATURES as INVOICE_RISK_FEATURES
from devkit.modeling.invoices import generate
from pipeline.topics import ModelTopics, batch_progress_topic, control_topic
from schemas.models import FeatureValue, InferenceRequest, Inputs, Tensor, TensorDatatype

SCALER = "scaler"
INVOICE_RISK = "invoice_risk"
MODELS = (SCALER, INVOICE_RISK)
SCALER_FEATURES = ("f0", "f1", "f2", "f3")
SCALER_V1_FACTOR = 2.0
"""Version 1 of the scaler doubles its inputs (``deploy/triton/models/scaler``)."""

WORKER_MAX_MESSAGE_BYTES = 64 * 1024
"""The worker under test runs with ``workers.max_message_bytes`` set to this."""
OVER_WORKER_LIMIT_BYTES = 200 * 1024
NEAR_BROKER_LIMIT_BYTES = 900 * 1024
"""The broker takes batches up to 1,048,588 bytes (``message.max.bytes``'s default)."""
PRODUCER_MESSAGE_MAX_BYTES = 1_048_588


class Outcome(StrEnum):
    OK = "ok"
    DLQ = "dlq"
    REJECTED = "rejected"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Expect:
    outcome: Outcome
    reasons: frozenset[str] = frozenset()
    """Allowed ``reason_code`` (dead letter) or ``error_code`` (rejected result)."""
    reply: bool = False
    """One copy of the answer on the test's reply topic (for a dead letter: a ``rejected``
    reply with the letter's reason as ``error_code``)."""
    scaled: tuple[float, ...] | None = None
    """For an ``ok`` scaler answer: the expected ``y`` (version 1: twice the input)."""


@dataclass
class Hostile:
    kind: str
    model: str
    """Whose requests topic the record is published on."""
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str | bytes, bytes | None]] | None
    expect: Expect
    request_id: str | None = None
    """The request id when the record decodes that far."""
    reply_to: str | None = None
    # Filled in from the delivery report.
    partition: int = -1
    offset: int = -1
    delivery_error: str | None = None
    published_at: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class Context:
    namespace: str
    reply_topic: str
    rng: random.Random

    def topics(self, model: str) -> ModelTopics:
        return ModelTopics(self.namespace, model)

    def other_model(self, model: str) -> str:
        return INVOICE_RISK if model == SCALER else SCALER

    def any_model(self) -> str:
        return self.rng.choice(MODELS)


def reply_topic_for(namespace: str, name: str) -> str:
    """An allowed reply topic: ``<ns>.replies.<name>``."""
    return f"{namespace}.replies.{name}"


# ----------------------------------------------------------------------------- good requests


@cache
def _invoice_rows() -> tuple[tuple[float, ...], ...]:
    """Realistic invoices from the demo model's seeded generator."""
    x = generate(2000, seed=20261127).x
    return tuple(tuple(float(v) for v in row) for row in x)


def scaler_features(ctx: Context) -> dict[str, float]:
    return {name: round(ctx.rng.uniform(-100.0, 100.0), 3) for name in SCALER_FEATURES}


def invoice_features(ctx: Context) -> dict[str, float]:
    row = ctx.rng.choice(_invoice_rows())
    return dict(zip(INVOICE_RISK_FEATURES, row, strict=True))


def fp32_tensor(values: Sequence[float], shape: Sequence[int], name: str = "x") -> Tensor:
    data = np.asarray(values, dtype="<f4").tobytes()
    return Tensor(name=name, datatype=TensorDatatype.FP32, shape=list(shape), data=data)


def _request(model: str, inputs: Inputs, **fields: object) -> InferenceRequest:
    return InferenceRequest(request_id=uuid.uuid4(), model=model, inputs=inputs, **fields)


def _record(
    kind: str,
    topic_model: str,
    request: InferenceRequest,
    expect: Expect,
    *,
    key: bytes | None = None,
    headers: list[tuple[str | bytes, bytes | None]] | None = None,
    value: bytes | None = None,
) -> Hostile:
    rid = str(request.request_id)
    return Hostile(
        kind=kind,
        model=topic_model,
        key=rid.encode() if key is None else key,
        value=schemas.encode(request) if value is None else value,
        headers=headers,
        expect=expect,
        request_id=rid,
        reply_to=request.reply_to,
    )


def _scaled(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(np.float32(v) * np.float32(SCALER_V1_FACTOR)) for v in values)


def good_scaler(ctx: Context, reply: bool = False, kind: str = "good_scaler") -> Hostile:
    features = scaler_features(ctx)
    reply_to = ctx.reply_topic if reply else None
    request = _request(SCALER, Inputs(features=features), reply_to=reply_to)
    expect = Expect(Outcome.OK, reply=reply, scaled=_scaled(list(features.values())))
    return _record(kind, SCALER, request, expect)


def good_scaler_tensor(
    ctx: Context, reply: bool = False, kind: str = "good_scaler_tensor"
) -> Hostile:
    values = list(scaler_features(ctx).values())
    reply_to = ctx.reply_topic if reply else None
    request = _request(SCALER, Inputs(tensors=[fp32_tensor(values, [1, 4])]), reply_to=reply_to)
    return _record(kind, SCALER, request, Expect(Outcome.OK, reply=reply, scaled=_scaled(values)))


def good_invoice(ctx: Context, reply: bool = False, kind: str = "good_invoice_risk") -> Hostile:
    reply_to = ctx.reply_topic if reply else None
    request = _request(
        INVOICE_RISK,
        Inputs(features=invoice_features(ctx)),
        reply_to=reply_to,
        explain=ctx.rng.random() < 0.25,
    )
    return _record(kind, INVOICE_RISK, request, Expect(Outcome.OK, reply=reply))


def good(ctx: Context, reply_share: float = 0.2) -> Hostile:
    """One good request of either model: scaler features or tensors, or an invoice."""
    reply = ctx.rng.random() < reply_share
    pick = ctx.rng.random()
    if pick < 0.40:
        return good_scaler(ctx, reply)
    if pick < 0.55:
        return good_scaler_tensor(ctx, reply)
    return good_invoice(ctx, reply)


def _good_request(ctx: Context, model: str, **fields: object) -> InferenceRequest:
    features: dict[str, FeatureValue] = dict(
        scaler_features(ctx) if model == SCALER else invoice_features(ctx)
    )
    return _request(model, Inputs(features=features), **fields)


# ----------------------------------------------------------------------------- undecodable


def _dlq(*reasons: str, reply: bool = False) -> Expect:
    return Expect(Outcome.DLQ, frozenset(reasons), reply=reply)


def _raw(ctx: Context, kind: str, value: bytes | None, expect: Expect) -> list[Hostile]:
    key = f"{kind}-{ctx.rng.getrandbits(32):08x}".encode()
    return [Hostile(kind, ctx.any_model(), key, value, None, expect)]


def random_bytes(ctx: Context) -> list[Hostile]:
    size = ctx.rng.randint(1, 512)
    first = ctx.rng.choice([b for b in range(256) if b not in (0x00, 0xC3)])
    value = bytes([first]) + ctx.rng.randbytes(size - 1)
    return _raw(ctx, "random_bytes", value, _dlq("bad_marker"))


def unknown_fingerprint(ctx: Context) -> list[Hostile]:
    body = schemas.encode(_good_request(ctx, SCALER))[10:]
    value = b"\xc3\x01" + ctx.rng.randbytes(8) + body
    return _raw(ctx, "unknown_fingerprint", value, _dlq("unknown_schema"))


def truncated(ctx: Context) -> list[Hostile]:
    model = ctx.any_model()
    encoded = schemas.encode(_good_request(ctx, model))
    value = encoded[: len(encoded) - ctx.rng.randint(1, len(encoded) // 2)]
    record = _raw(ctx, "truncated", value, _dlq("truncated", "malformed"))[0]
    record.model = model
    return [record]


def _request_prefix() -> bytes:
    """The single-object marker and the current ``InferenceRequest`` fingerprint."""
    return schemas.encode(
        InferenceRequest(request_id=uuid.UUID(int=0), model="m", inputs=Inputs(features={}))
    )[:10]


def over_worker_limit(ctx: Context) -> list[Hostile]:
    value = _request_prefix() + ctx.rng.randbytes(OVER_WORKER_LIMIT_BYTES)
    return _raw(ctx, "over_worker_limit", value, _dlq("too_large"))


def near_broker_limit(ctx: Context) -> list[Hostile]:
    value = _request_prefix() + ctx.rng.randbytes(NEAR_BROKER_LIMIT_BYTES)
    return _raw(ctx, "near_broker_limit", value, _dlq("too_large"))


def empty_value(ctx: Context) -> list[Hostile]:
    return _raw(ctx, "empty_value", b"", _dlq("empty"))


def tombstone(ctx: Context) -> list[Hostile]:
    return _raw(ctx, "tombstone", None, _dlq("empty"))


def _hostile_headers(ctx: Context) -> list[tuple[str | bytes, bytes | None]]:
    return [
        (b"\xff\xfe-bad-key-" + ctx.rng.randbytes(4), b"v"),
        ("k" * 300, b"long key"),
        ("bad-value", b"\xc3\x28\xff\xfe"),
        *((f"h{i}", b"x") for i in range(4100)),
    ]


def undecodable_hostile_headers(ctx: Context) -> list[Hostile]:
    """Random bytes with headers a dead letter cannot carry as they are (an invalid UTF-8
    name, a name over 256 characters, more than 4,096 of them)."""
    record = random_bytes(ctx)[0]
    record.kind = "undecodable_hostile_headers"
    record.headers = _hostile_headers(ctx)
    record.key = b"\xff\xfe\xfd" + ctx.rng.randbytes(6)
    return [record]


# ----------------------------------------------------------------------------- invalid input


def _invalid_features(
    ctx: Context,
    kind: str,
    model: str,
    change: Callable[[dict[str, FeatureValue]], None],
    reasons: Sequence[str],
    reply: bool = False,
) -> list[Hostile]:
    features: dict[str, FeatureValue] = dict(
        scaler_features(ctx) if model == SCALER else invoice_features(ctx)
    )
    change(features)
    reply_to = ctx.reply_topic if reply else None
    request = _request(model, Inputs(features=features), reply_to=reply_to)
    return [_record(kind, model, request, _dlq(*reasons, reply=reply))]


def _pick_feature(ctx: Context, features: dict[str, FeatureValue]) -> str:
    return ctx.rng.choice(sorted(features))


def feature_string(ctx: Context) -> list[Hostile]:
    def change(f: dict[str, FeatureValue]) -> None:
        f[_pick_feature(ctx, f)] = "12.5"

    return _invalid_features(ctx, "feature_string", ctx.any_model(), change, ["invalid_feature"])


def feature_missing(ctx: Context) -> list[Hostile]:
    def change(f: dict[str, FeatureValue]) -> None:
        del f[_pick_feature(ctx, f)]

    return _invalid_features(ctx, "feature_missing", ctx.any_model(), change, ["missing_feature"])


def feature_null(ctx: Context) -> list[Hostile]:
    def change(f: dict[str, FeatureValue]) -> None:
        f[_pick_feature(ctx, f)] = None

    return _invalid_features(
        ctx, "feature_null", ctx.any_model(), change, ["missing_feature", "invalid_feature"]
    )


def feature_nan(ctx: Context) -> list[Hostile]:
    def change(f: dict[str, FeatureValue]) -> None:
        f[_pick_feature(ctx, f)] = math.nan

    return _invalid_features(
        ctx, "feature_nan", ctx.any_model(), change, ["invalid_feature", "invalid"]
    )


def feature_inf(ctx: Context) -> list[Hostile]:
    def change(f: dict[str, FeatureValue]) -> None:
        f[_pick_feature(ctx, f)] = ctx.rng.choice([math.inf, -math.inf])

    return _invalid_features(
        ctx, "feature_inf", ctx.any_model(), change, ["invalid_feature", "invalid"]
    )


def feature_string_with_reply(ctx: Context) -> list[Hostile]:
    def change(f: dict[str, FeatureValue]) -> None:
        f[_pick_feature(ctx, f)] = "not a number"

    return _invalid_features(
        ctx, "feature_string_with_reply", ctx.any_model(), change, ["invalid_feature"], reply=True
    )


def unknown_model(ctx: Context, reply: bool = False, kind: str = "unknown_model") -> list[Hostile]:
    reply_to = ctx.reply_topic if reply else None
    request = _request("nope", Inputs(features=dict(scaler_features(ctx))), reply_to=reply_to)
    return [_record(kind, SCALER, request, _dlq("unknown_model", reply=reply))]


def unknown_model_with_reply(ctx: Context) -> list[Hostile]:
    return unknown_model(ctx, reply=True, kind="unknown_model_with_reply")


def _tensor_request(
    ctx: Context, kind: str, tensors: list[Tensor], reply: bool = False, model: str = SCALER
) -> list[Hostile]:
    reply_to = ctx.reply_topic if reply else None
    request = _request(model, Inputs(tensors=tensors), reply_to=reply_to)
    return [_record(kind, model, request, _dlq("invalid_tensor", reply=reply))]


def _values(ctx: Context, n: int) -> list[float]:
    return [round(ctx.rng.uniform(-10, 10), 3) for _ in range(n)]


def tensor_wrong_name(ctx: Context) -> list[Hostile]:
    return _tensor_request(ctx, "tensor_wrong_name", [fp32_tensor(_values(ctx, 4), [1, 4], "nope")])


def tensor_shape_1x5(ctx: Context) -> list[Hostile]:
    return _tensor_request(ctx, "tensor_shape_1x5", [fp32_tensor(_values(ctx, 5), [1, 5])])


def tensor_shape_2x2x2(ctx: Context) -> list[Hostile]:
    return _tensor_request(ctx, "tensor_shape_2x2x2", [fp32_tensor(_values(ctx, 8), [2, 2, 2])])


def tensor_shape_other_model(ctx: Context) -> list[Hostile]:
    """The scaler's four columns sent to invoice_risk, which takes eight."""
    tensors = [fp32_tensor(_values(ctx, 4), [1, 4])]
    return _tensor_request(ctx, "tensor_shape_other_model", tensors, model=INVOICE_RISK)


def _typed(datatype: TensorDatatype, data: bytes, shape: Sequence[int] = (1, 4)) -> Tensor:
    return Tensor(name="x", datatype=datatype, shape=list(shape), data=data)


def tensor_fp64(ctx: Context) -> list[Hostile]:
    data = np.asarray(_values(ctx, 4), dtype="<f8").tobytes()
    return _tensor_request(ctx, "tensor_fp64", [_typed(TensorDatatype.FP64, data)])


def tensor_int8(ctx: Context) -> list[Hostile]:
    data = bytes(ctx.rng.randrange(256) for _ in range(4))
    return _tensor_request(ctx, "tensor_int8", [_typed(TensorDatatype.INT8, data)])


def tensor_bytes(ctx: Context) -> list[Hostile]:
    elements = [f"{v}".encode() for v in _values(ctx, 4)]
    data = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    return _tensor_request(ctx, "tensor_bytes", [_typed(TensorDatatype.BYTES, data)])


def tensor_two_inputs(ctx: Context) -> list[Hostile]:
    """The declared input and an extra one."""
    tensors = [fp32_tensor(_values(ctx, 4), [1, 4]), fp32_tensor(_values(ctx, 4), [1, 4], "x2")]
    return _tensor_request(ctx, "tensor_two_inputs", tensors)


def tensor_with_reply(ctx: Context) -> list[Hostile]:
    tensors = [fp32_tensor(_values(ctx, 5), [1, 5])]
    return _tensor_request(ctx, "tensor_with_reply", tensors, reply=True)


def mixed_dtype_neighbours(ctx: Context) -> list[Hostile]:
    """Good FP32 rows and FP16 / INT32 / FP64 rows back to back on one partition (one key),
    so they meet in one micro-batch: the bad ones are rejected, the good ones served."""
    key = f"neighbours-{ctx.rng.getrandbits(32):08x}".encode()
    records: list[Hostile] = []
    bad = [
        _typed(TensorDatatype.FP16, np.asarray(_values(ctx, 4), dtype="<f2").tobytes()),
        _typed(TensorDatatype.INT32, np.asarray([1, 2, 3, 4], dtype="<i4").tobytes()),
        _typed(TensorDatatype.FP64, np.asarray(_values(ctx, 4), dtype="<f8").tobytes()),
    ]
    for tensor in bad:
        good_one = good_scaler_tensor(ctx, kind="mixed_dtype_neighbours")
        good_one.key = key
        records.append(good_one)
        request = _request(SCALER, Inputs(tensors=[tensor]))
        records.append(
            _record("mixed_dtype_neighbours", SCALER, request, _dlq("invalid_tensor"), key=key)
        )
    return records


# ----------------------------------------------------------------------------- keys and headers


def _good_with(
    ctx: Context,
    kind: str,
    *,
    key: bytes | None = None,
    headers: list[tuple[str | bytes, bytes | None]] | None = None,
) -> list[Hostile]:
    record = good(ctx, reply_share=0.0)
    record.kind = kind
    record.key = key
    record.headers = headers
    return [record]


def key_invalid_utf8(ctx: Context) -> list[Hostile]:
    return _good_with(ctx, "key_invalid_utf8", key=b"\xff\xfe\xc3\x28" + ctx.rng.randbytes(8))


def key_absent(ctx: Context) -> list[Hostile]:
    return _good_with(ctx, "key_absent", key=None)


def header_value_invalid_utf8(ctx: Context) -> list[Hostile]:
    headers: list[tuple[str | bytes, bytes | None]] = [
        ("traceparent", b"\xff\xfe\xfd" + ctx.rng.randbytes(8)),
        ("content-type", b"\xc3\x28"),
        ("empty", None),
    ]
    return _good_with(ctx, "header_value_invalid_utf8", key=b"k", headers=headers)


def header_key_invalid_utf8(ctx: Context) -> list[Hostile]:
    # confluent-kafka takes a bytes header name as it is (a str with lone surrogates would
    # crash the producing process instead).
    headers: list[tuple[str | bytes, bytes | None]] = [(b"\xff\xfe\x80name", b"v")]
    return _good_with(ctx, "header_key_invalid_utf8", key=b"k", headers=headers)


def header_key_long(ctx: Context) -> list[Hostile]:
    headers: list[tuple[str | bytes, bytes | None]] = [("h" * 300, b"v"), ("x" * 5000, b"w")]
    return _good_with(ctx, "header_key_long", key=b"k", headers=headers)


def headers_many(ctx: Context) -> list[Hostile]:
    headers: list[tuple[str | bytes, bytes | None]] = [
        (f"h{i}", str(i).encode()) for i in range(4100 + ctx.rng.randrange(1000))
    ]
    return _good_with(ctx, "headers_many", key=b"k", headers=headers)


# ----------------------------------------------------------------------------- reply_to


def _forged(ctx: Context, kind: str, model: str, reply_to: str) -> list[Hostile]:
    request = _good_request(ctx, model, reply_to=reply_to)
    expect = Expect(Outcome.REJECTED, frozenset({"reply_to_not_allowed"}))
    return [_record(kind, model, request, expect)]


def reply_to_control(ctx: Context) -> list[Hostile]:
    return _forged(ctx, "reply_to_control", ctx.any_model(), control_topic(ctx.namespace))


def reply_to_consumer_offsets(ctx: Context) -> list[Hostile]:
    return _forged(ctx, "reply_to_consumer_offsets", ctx.any_model(), "__consumer_offsets")


def reply_to_other_results(ctx: Context) -> list[Hostile]:
    model = ctx.any_model()
    other = ctx.topics(ctx.other_model(model)).results
    return _forged(ctx, "reply_to_other_results", model, other)


def reply_to_own_requests(ctx: Context) -> list[Hostile]:
    model = ctx.any_model()
    return _forged(ctx, "reply_to_own_requests", model, ctx.topics(model).requests)


def reply_to_checkpoints(ctx: Context) -> list[Hostile]:
    return _forged(ctx, "reply_to_checkpoints", ctx.any_model(), checkpoints_topic(ctx.namespace))


def reply_to_batch_progress(ctx: Context) -> list[Hostile]:
    topic = batch_progress_topic(ctx.namespace)
    return _forged(ctx, "reply_to_batch_progress", ctx.any_model(), topic)


def reply_to_lookalike(ctx: Context) -> list[Hostile]:
    """Names that only look like ``<ns>.replies.*``."""
    name = ctx.rng.choice(
        [
            f"{ctx.namespace}.replies",
            f"{ctx.namespace}.repliesx.y",
            f"other.replies.{ctx.namespace}",
        ]
    )
    return _forged(ctx, "reply_to_lookalike", ctx.any_model(), name)


def checkpoints_topic(namespace: str) -> str:
    """The connectors' checkpoint topic (``connectors.common.checkpoint.checkpoint_topic``)."""
    return f"{namespace}.connectors.checkpoints"


def missing_reply_topic_name(namespace: str) -> str:
    return reply_topic_for(namespace, f"no-such-{uuid.uuid4().hex}")


def reply_to_missing_topic(ctx: Context) -> list[Hostile]:
    request = _good_request(ctx, ctx.any_model(), reply_to=missing_reply_topic_name(ctx.namespace))
    record = _record("reply_to_missing_topic", request.model, request, Expect(Outcome.OK))
    features = request.inputs.features or {}
    if request.model == SCALER:
        values = [float(features[name] or 0.0) for name in SCALER_FEATURES]
        record.expect = Expect(Outcome.OK, scaled=_scaled(values))
    return [record]


# ----------------------------------------------------------------------------- versions, deadlines


def _pinned(ctx: Context, kind: str, version: str) -> list[Hostile]:
    model = ctx.any_model()
    request = _good_request(ctx, model, model_version=version)
    expect = Expect(Outcome.REJECTED, frozenset({"unknown_version"}))
    return [_record(kind, model, request, expect)]


def version_unknown(ctx: Context) -> list[Hostile]:
    return _pinned(ctx, "version_unknown", "99")


def version_path(ctx: Context) -> list[Hostile]:
    return _pinned(ctx, "version_path", "1/../x")


def version_long(ctx: Context) -> list[Hostile]:
    return _pinned(ctx, "version_long", "1" + "0" * 199)


def version_pipe(ctx: Context) -> list[Hostile]:
    return _pinned(ctx, "version_pipe", "1|2")


def deadline_past(ctx: Context) -> list[Hostile]:
    model = ctx.any_model()
    past = datetime.now(UTC) - timedelta(seconds=ctx.rng.randint(1, 3600))
    request = _good_request(ctx, model, deadline=past)
    return [_record("deadline_past", model, request, Expect(Outcome.EXPIRED))]


Builder = Callable[[Context], list[Hostile]]

KINDS: dict[str, Builder] = {
    builder.__name__: builder
    for builder in (
        random_bytes,
        unknown_fingerprint,
        truncated,
        over_worker_limit,
        near_broker_limit,
        empty_value,
        tombstone,
        undecodable_hostile_headers,
        feature_string,
        feature_missing,
        feature_null,
        feature_nan,
        feature_inf,
        feature_string_with_reply,
        unknown_model,
        unknown_model_with_reply,
        key_invalid_utf8,
        key_absent,
        header_value_invalid_utf8,
        header_key_invalid_utf8,
        header_key_long,
        headers_many,
        reply_to_control,
        reply_to_consumer_offsets,
        reply_to_other_results,
        reply_to_own_requests,
        reply_to_checkpoints,
        reply_to_batch_progress,
        reply_to_lookalike,
        reply_to_missing_topic,
        version_unknown,
        version_path,
        version_long,
        version_pipe,
        tensor_wrong_name,
        tensor_shape_1x5,
        tensor_shape_2x2x2,
        tensor_shape_other_model,
        tensor_fp64,
        tensor_int8,
        tensor_bytes,
        tensor_two_inputs,
        tensor_with_reply,
        mixed_dtype_neighbours,
        deadline_past,
    )
}
"""Every hostile kind by name; ``CHAOS_KINDS`` picks a subset."""
