"""The personal data policy at every exit of the worker, against hostile names and values.

A canary value sits in a PII feature; each test checks the canary (as text, and as the
float64/float32 bytes Avro and numpy write) is nowhere in what leaves, and that what may
leave is still there, so a policy that dropped everything would fail too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas
from pipeline import privacy
from pipeline.backends import BackendError, RowInput, RowOutput
from pipeline.backends.base import ATTRIBUTIONS_OUTPUT
from pipeline.backends.signature import ModelSignature
from pipeline.privacy import (
    MASKED,
    ORIGINAL_HEADER,
    FeaturePolicy,
    OriginalPolicy,
    PrivacyError,
    associated_data,
    hash_value,
    key_id,
    open_original,
    seal,
)
from pipeline.resilience import RetryPolicy
from pipeline.settings import ModelSettings, Settings, SettingsError, WorkerSettings, load_settings
from pipeline.storage.segments import build_segment
from pipeline.topics import ModelTopics
from schemas.models import DeadLetter, InferenceRequest, InferenceResult, Inputs, ResultStatus
from tests.unit.fakes import FakeMessage
from tests.unit.memory_kafka import (
    MemoryBroker,
    MemoryConsumer,
    MemoryProducer,
    MemoryStore,
    NoControl,
    scaler_signature,
)
from workers.inference import contracts
from workers.inference.sink import letter_limits
from workers.inference.worker import InferenceWorker

CANARY = 48213.8125
"""Exactly representable in float32, so every spelling of it is the same number."""
CANARY_TEXT = "48213.8125"
HASH_KEY = b"test-hash-key-0123456789"
AES_KEY = bytes(range(32))
AES_KEY_TEXT = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
FEATURES = ("salary", "email_id", "age", "amount")
POLICY = FeaturePolicy({"salary": "drop", "email_id": "hash", "age": "mask"}, HASH_KEY)
LIMITS = letter_limits(1_000_000, 256 * 1024)
NOW = datetime(2026, 12, 2, tzinfo=UTC)


def canary_spellings(value: float = CANARY, text: str = CANARY_TEXT) -> list[bytes]:
    return [text.encode(), struct.pack("<d", value), struct.pack("<f", value)]


def assert_no_canary(data: bytes | str, where: str, spellings: Sequence[bytes] = ()) -> None:
    blob = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    for spelt in spellings or canary_spellings():
        assert spelt not in blob, f"the canary ({spelt!r}) leaked into {where}"


def a_request(features: dict[str, Any], **fields: Any) -> InferenceRequest:
    return InferenceRequest(
        request_id=uuid.uuid4(), model="scaler", inputs=Inputs(features=features), **fields
    )


PII_REQUEST = a_request(
    {"salary": CANARY, "email_id": CANARY, "age": CANARY, "amount": 12.5}, explain=True
)


# ---------------------------------------------------------------------------- the policy


def test_drop_leaves_the_name_out_hash_and_mask_replace_the_value() -> None:
    shown = POLICY.features({"salary": 1.0, "email_id": "a@b.c", "age": 42, "amount": 7.0})
    assert shown is not None
    assert "salary" not in shown
    assert shown["email_id"] == hash_value("a@b.c", HASH_KEY)
    assert str(shown["email_id"]).startswith("hmac-sha256:")
    assert shown["age"] == MASKED
    assert shown["amount"] == 7.0, "a feature without a treatment leaves as it is"


def test_missing_values_stay_missing_and_no_record_stays_none() -> None:
    assert POLICY.features(None) is None
    assert POLICY.features({"email_id": None, "age": None, "salary": None}) == {
        "email_id": None,
        "age": None,
    }


def test_the_hash_is_stable_keyed_and_typed() -> None:
    assert hash_value("x@y.z", HASH_KEY) == hash_value("x@y.z", HASH_KEY), "joins still work"
    assert hash_value("x@y.z", HASH_KEY) != hash_value("x@y.z", b"another key"), (
        "without the key a dictionary of values cannot be hashed to reverse it"
    )
    assert hash_value(1, HASH_KEY) == hash_value(1.0, HASH_KEY), "the same number, written twice"
    assert hash_value("1", HASH_KEY) != hash_value(1, HASH_KEY)
    assert hash_value(True, HASH_KEY) != hash_value(1, HASH_KEY)
    assert hash_value(1.5, HASH_KEY) != hash_value(2.5, HASH_KEY)


def test_a_hash_policy_without_a_key_is_refused() -> None:
    with pytest.raises(ValueError, match="pii_hash_key"):
        FeaturePolicy({"a": "hash"})


hostile_names = st.text(min_size=1, max_size=300)
hostile_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=2000),  # unicode, lone surrogates, control characters
    st.just("x" * 100_000),
)


@settings(max_examples=200, deadline=None)
@given(
    features=st.dictionaries(hostile_names, hostile_values, max_size=20),
    treatments=st.lists(st.sampled_from(["drop", "hash", "mask"]), max_size=20),
)
def test_any_record_under_any_policy_keeps_no_treated_value(
    features: dict[str, Any], treatments: list[str]
) -> None:
    policy = FeaturePolicy(dict(zip(features, treatments, strict=False)), HASH_KEY)  # type: ignore[arg-type]
    shown = policy.features(features)
    assert shown is not None
    for name, value in features.items():
        treatment = policy.treatments.get(name)
        if treatment is None:
            assert shown[name] is value or (isinstance(value, float) and math.isnan(value))
        elif treatment == "drop":
            assert name not in shown
        elif value is None:
            assert shown[name] is None
        elif treatment == "mask":
            assert shown[name] == MASKED
        else:
            assert shown[name] == hash_value(value, HASH_KEY)
            assert len(str(shown[name])) == len("hmac-sha256:") + 32


@settings(max_examples=100, deadline=None)
@given(value=st.one_of(st.floats(allow_nan=False, min_value=-1e12, max_value=1e12), st.text()))
def test_scrubbing_removes_every_spelling_of_a_pii_value(value: float | str) -> None:
    message = f"row [{value}] and {value!r} and {value} failed"
    scrubbed = POLICY.scrub(message, {"salary": value})
    for spelt in privacy.renderings(value):
        assert spelt not in scrubbed
    assert scrubbed.startswith("row [")


def test_attributions_of_pii_features_never_leave() -> None:
    assert POLICY.attributions({"salary": 1.0, "email_id": 2.0, "age": 3.0, "amount": 4.0}) == {
        "amount": 4.0
    }


# ---------------------------------------------------------------------------- exits


def explained_output() -> RowOutput:
    # The PII features' attributions are the largest: top-k would pick them first.
    return RowOutput(
        tensors={
            "score": np.array([0.25], dtype=np.float32),
            ATTRIBUTIONS_OUTPUT: np.array([CANARY, CANARY, CANARY, 0.5], dtype=np.float32),
        }
    )


def test_the_segment_keeps_outputs_and_drops_pii_attributions() -> None:
    record = contracts.full_record(
        PII_REQUEST, explained_output(), "scaler", "1", FEATURES, policy=POLICY
    )
    assert record["attributions"] == {"amount": 0.5}
    assert record["outputs"]["score"] == [0.25]
    segment = build_segment("scaler", "1", [record], [str(PII_REQUEST.request_id)], NOW)
    assert_no_canary(segment.body, "the segment")


@pytest.mark.parametrize("build", ["ok", "expired"])
def test_results_echo_features_under_the_policy(build: str) -> None:
    if build == "ok":
        record = contracts.ok_result(
            PII_REQUEST,
            explained_output(),
            model="scaler",
            version="1",
            worker_id="w",
            feature_names=FEATURES,
            bucket="b",
            key="k",
            etag="e",
            offset=0,
            length=1,
            queued_ms=0,
            backend_ms=0,
            total_ms=0,
            echo_features=True,
            policy=POLICY,
        )
    else:
        record = contracts.expired_result(
            PII_REQUEST, model="scaler", worker_id="w", echo_features=True, policy=POLICY
        )
    value, headers = contracts.encode_result(record)
    assert_no_canary(value, f"the {build} result")
    assert_no_canary(b"".join(v for _, v in headers), "its headers")
    result = schemas.decode(value, InferenceResult)
    assert result.input_features == {
        "email_id": hash_value(CANARY, HASH_KEY),
        "age": MASKED,
        "amount": 12.5,
    }
    if build == "ok":
        assert result.explanation is not None
        assert [a.feature for a in result.explanation.attributions or []] == ["amount"]


def test_a_rejected_reply_never_quotes_a_pii_value() -> None:
    record = contracts.rejected_result(
        PII_REQUEST,
        model="scaler",
        worker_id="w",
        code="backend_bad_request",
        message=f"triton: input value {CANARY} out of range for row [{CANARY!r}]",
        policy=POLICY,
    )
    value, _ = contracts.encode_result(record)
    assert_no_canary(value, "the rejected result")
    assert "out of range" in (schemas.decode(value, InferenceResult).error_message or "")


def _letter(
    message: FakeMessage, originals: OriginalPolicy, detail: str = "bad"
) -> tuple[contracts.LetterDraft, DeadLetter]:
    draft = contracts.build_dead_letter(
        message,
        "invalid_feature",
        detail,
        "UnservableRecord",
        0,
        1_764_000_000_000,
        model="scaler",
        worker_id="w",
        bucket="bucket",
        **LIMITS,
        originals=originals,
        policy=POLICY,
        features=PII_REQUEST.inputs.features,
    )
    return draft, schemas.decode(draft.value, DeadLetter)


ORIGINAL = schemas.encode(PII_REQUEST)
ENCRYPT = OriginalPolicy("encrypt", AES_KEY)


def test_a_kept_original_is_the_record_as_it_came() -> None:
    _, letter = _letter(FakeMessage(ORIGINAL), OriginalPolicy("keep"))
    assert letter.original_value == ORIGINAL


def test_a_dropped_original_leaves_no_trace_and_says_so() -> None:
    draft, letter = _letter(FakeMessage(ORIGINAL), OriginalPolicy("drop"), detail=CANARY_TEXT)
    assert letter.original_value is None
    assert letter.original_ref is None
    assert (ORIGINAL_HEADER, b"dropped") in draft.headers
    assert draft.offload_body is None
    assert_no_canary(draft.value, "the letter")
    assert letter.reason_code == "invalid_feature"


def test_an_encrypted_original_opens_with_the_key_and_the_record_it_came_from() -> None:
    message = FakeMessage(ORIGINAL, topic_name="ns.scaler.requests", partition_number=3)
    message.offset_number = 77
    draft, letter = _letter(message, ENCRYPT, detail=f"value {CANARY} refused")
    assert_no_canary(draft.value, "the letter")
    assert (ORIGINAL_HEADER, f"encrypted;key_id={key_id(AES_KEY)}".encode()) in draft.headers
    assert letter.original_value is not None
    aad = associated_data(letter.original_topic, letter.original_partition, letter.original_offset)
    assert open_original(letter.original_value, [b"\x01" * 32, AES_KEY], aad) == ORIGINAL
    assert "refused" in letter.reason_message


def test_an_offloaded_original_is_encrypted_before_it_is_stored() -> None:
    half = "x" * (LIMITS["inline_limit"] // 2 + 10)
    large = a_request({"salary": CANARY, "note": half, "more": half})
    original = schemas.encode(large)
    draft, letter = _letter(FakeMessage(original), ENCRYPT)
    assert letter.original_value is None
    assert letter.original_ref is not None
    assert draft.offload_body is not None
    assert_no_canary(draft.offload_body, "the offloaded original")
    assert b"x" * 100 not in draft.offload_body
    aad = associated_data("inference.scaler.requests", 0, 0)
    assert open_original(draft.offload_body, [AES_KEY], aad) == original


def test_a_dropped_original_is_not_offloaded_either() -> None:
    half = "x" * (LIMITS["inline_limit"] // 2 + 10)
    large = schemas.encode(a_request({"salary": CANARY, "note": half, "more": half}))
    draft, letter = _letter(FakeMessage(large), OriginalPolicy("drop"))
    assert draft.offload_key is None
    assert draft.offload_body is None
    assert letter.original_ref is None


@pytest.mark.parametrize(
    "region", ["magic", "key id", "nonce", "ciphertext", "tag", "truncated", "appended"]
)
def test_a_tampered_envelope_never_opens(region: str) -> None:
    aad = associated_data("t", 0, 5)
    envelope = bytearray(seal(ORIGINAL, AES_KEY, aad))
    id_end = len(privacy.ENVELOPE_MAGIC) + 1 + privacy.KEY_ID_CHARS
    spots = {
        "magic": 0,
        "key id": id_end - 1,
        "nonce": id_end + 2,
        "ciphertext": id_end + privacy.NONCE_BYTES + 3,
        "tag": len(envelope) - 1,
    }
    if region == "truncated":
        tampered = bytes(envelope[:-1])
    elif region == "appended":
        tampered = bytes(envelope) + b"\0"
    else:
        envelope[spots[region]] ^= 0x01
        tampered = bytes(envelope)
    with pytest.raises(PrivacyError):
        open_original(tampered, [AES_KEY], aad)


def test_an_envelope_moved_to_another_record_or_key_does_not_open() -> None:
    envelope = seal(b"payload", AES_KEY, associated_data("t", 0, 5))
    with pytest.raises(PrivacyError, match="not from this"):
        open_original(envelope, [AES_KEY], associated_data("t", 0, 6))
    with pytest.raises(PrivacyError, match="not among the keys"):
        open_original(envelope, [b"\x02" * 32], associated_data("t", 0, 5))
    with pytest.raises(PrivacyError, match="not a sealed original"):
        open_original(b"raw avro bytes", [AES_KEY], associated_data("t", 0, 5))
    assert open_original(seal(b"", AES_KEY, b"a"), [AES_KEY], b"a") == b""


# ---------------------------------------------------------------------------- settings


def test_settings_refuse_policies_that_would_protect_nothing_and_never_quote_a_key() -> None:
    with pytest.raises(SettingsError, match="not in feature_order"):
        load_settings(models={"m": {"feature_order": ["a"], "pii": {"emial": "drop"}}})
    with pytest.raises(SettingsError, match="needs dead_letter_key"):
        load_settings(workers={"dead_letter_original": "encrypt"})
    secret = "not-base64-secret-value!"
    with pytest.raises(SettingsError) as refused:
        load_settings(workers={"dead_letter_key": secret})
    assert secret not in str(refused.value)
    assert "dead_letter_key" in str(refused.value)
    with pytest.raises(SettingsError, match="16, 24 or 32 bytes"):
        load_settings(workers={"dead_letter_retired_keys": ["AAAA"]})
    assert (
        load_settings(
            workers={"dead_letter_original": "encrypt", "dead_letter_key": AES_KEY_TEXT}
        ).workers.dead_letter_key
        is not None
    )


def test_a_worker_with_a_pii_model_refuses_raw_dead_letters_and_keyless_hashes() -> None:
    model = ModelSettings(feature_order=("f0",), pii={"f0": "hash"})
    for workers, problem in [
        (WorkerSettings(pii_hash_key="k"), "dead_letter_original"),
        (WorkerSettings(dead_letter_original="drop"), "pii_hash_key"),
    ]:
        config = Settings(workers=workers, models={"m": model})
        with pytest.raises(SettingsError, match=problem):
            InferenceWorker(config, ["m"], {"triton": object()}, MemoryStore())  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the whole worker

NS = "p"
BOOM = 13.0
"""A value of f1 on which the backend raises an error quoting the batch."""


class QuotingBackend:
    """Doubles its input; on ``BOOM`` raises an unforeseen error whose message quotes the
    rows, as a careless library would."""

    endpoint = "memory-triton"

    async def infer(
        self,
        model: str,
        version: str | None,
        rows: Sequence[RowInput],
        *,
        time_left_s: float | None = None,
        priority: int | None = None,
    ) -> list[RowOutput | BackendError]:
        if any(float(row.tensors["x"][0, 1]) == BOOM for row in rows):
            raise ValueError(f"cannot take rows {[row.tensors['x'].tolist() for row in rows]}")
        return [RowOutput(tensors={"y": row.tensors["x"] * 2}) for row in rows]

    async def describe(self, model: str) -> ModelSignature:
        return scaler_signature()

    async def close(self) -> None:
        pass


def test_the_canary_leaves_the_worker_nowhere(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    scaler = ModelSettings(
        backend="triton",
        default_version="1",
        feature_order=("f0", "f1", "f2", "f3"),
        echo_features=True,
        pii={"f0": "drop", "f2": "hash", "f3": "mask"},
    )
    config = Settings(
        namespace=NS,
        workers=WorkerSettings(
            max_batch_size=8,
            max_wait_ms=1,
            commit_interval_ms=10,
            pii_hash_key="k" * 32,
            dead_letter_original="encrypt",
            dead_letter_key=AES_KEY_TEXT,
        ),
        models={"scaler": scaler},
    )
    broker = MemoryBroker()
    topics = ModelTopics(NS, "scaler")
    for name in (topics.requests, topics.batch, topics.results, topics.dlq, f"{NS}.replies.me"):
        broker.create_topic(name, 1)
    broker.create_topic(f"{NS}.control", 1)
    store = MemoryStore()
    worker = InferenceWorker(
        config,
        ["scaler"],
        {"triton": QuotingBackend()},
        store,
        consumer_factory=lambda model, group: MemoryConsumer(broker, group),
        producer=MemoryProducer(broker),
        control=NoControl(),
        reply_topic_exists=broker.has_topic,
        lag=False,
        retry=RetryPolicy(max_attempts=2, base_delay_s=0.001, max_delay_s=0.01),
    )

    def features(f1: float = 1.0, **more: Any) -> dict[str, Any]:
        return {"f0": CANARY, "f1": f1, "f2": CANARY, "f3": CANARY} | more

    reply = {"reply_to": f"{NS}.replies.me"}
    served = [a_request(features(), **reply) for _ in range(10)]
    invalid = a_request(features(f1="not a number"), **reply)  # type: ignore[arg-type]
    quoted = a_request(features(f1=BOOM), **reply)
    for one in [*served, invalid, quoted]:
        broker.append(topics.requests, schemas.encode(one), partition=0, key=str(one.request_id))

    async def scenario() -> None:
        task = asyncio.create_task(worker.run())
        deadline = asyncio.get_running_loop().time() + 30
        while len(broker.messages(topics.results)) + len(broker.messages(topics.dlq)) < 12:
            assert asyncio.get_running_loop().time() < deadline, "every outcome in time"
            await asyncio.sleep(0.005)
        worker.stop()
        await asyncio.wait_for(task, 30)

    asyncio.run(asyncio.wait_for(scenario(), 60))

    results = [
        schemas.decode(m.value() or b"", InferenceResult) for m in broker.messages(topics.results)
    ]
    assert [r.status for r in results] == [ResultStatus.OK] * 10
    assert all(r.outputs is not None and r.outputs.tensors for r in results)
    assert all(
        r.input_features == {"f1": 1.0, "f2": hash_value(CANARY, b"k" * 32), "f3": MASKED}
        for r in results
    )
    letters = [schemas.decode(m.value() or b"", DeadLetter) for m in broker.messages(topics.dlq)]
    assert sorted(letter.reason_code for letter in letters) == ["invalid_feature", "unprocessable"]
    for letter in letters:  # the operator can still read what was refused
        assert letter.original_value is not None
        aad = associated_data(
            letter.original_topic, letter.original_partition, letter.original_offset
        )
        assert CANARY_TEXT.encode() not in letter.original_value
        assert struct.pack("<d", CANARY) in open_original(letter.original_value, [AES_KEY], aad)
    assert len(broker.messages(f"{NS}.replies.me")) == 12
    for topic in (topics.results, topics.dlq, f"{NS}.replies.me"):
        for message in broker.messages(topic):
            assert_no_canary(message.value() or b"", f"a value on {topic}")
            key = message.key()
            assert_no_canary(key.encode() if isinstance(key, str) else key or b"", "a key")
            for name, value in message.headers() or []:
                assert_no_canary(name.encode() + (value or b""), f"a header on {topic}")
    assert store.objects, "the segments were written"
    for name, body in store.objects.items():
        assert_no_canary(name.encode() + body, f"object {name}")
    logged = "\n".join(
        f"{r.getMessage()} {r.exc_text or ''} {r.stack_info or ''}" for r in caplog.records
    )
    assert "unforeseen" in logged or "failed unexpectedly" in logged, "the failure was logged"
    assert_no_canary(logged, "the worker's log")


# ---------------------------------------------------------------------------- connectors

CONNECTOR_CANARY = "canary-7f3e9b@example.com"


@pytest.mark.parametrize(
    ("value", "spec"),
    [
        (CONNECTOR_CANARY, {"type": "float"}),
        ([CONNECTOR_CANARY], {"type": "float"}),
        ({"nested": CONNECTOR_CANARY}, {"type": "str"}),
        (CONNECTOR_CANARY, {"type": "bool"}),
        (CONNECTOR_CANARY, {"type": "int"}),
        (48213.8125, {"type": "int"}),
        (CONNECTOR_CANARY, {"type": "float", "transform": {"scale": 2}}),
        (CONNECTOR_CANARY, {"type": "str", "transform": {"map": {"A": "a"}}}),
        (CONNECTOR_CANARY, {"type": "float", "transform": {"days_until": True}}),
        (CONNECTOR_CANARY * 10_000, {"type": "float"}),
        ("\udcff" + CONNECTOR_CANARY, {"type": "float"}),
    ],
)
def test_a_connector_mapping_error_names_the_field_and_never_the_value(
    value: Any, spec: dict[str, Any]
) -> None:
    from connectors.common.mapping import parse_mapping
    from schemas.errors import UnservableRecord

    mapping = parse_mapping(
        {
            "model": "m",
            "source_system": "SYS",
            "entity_type": "Thing",
            "entity_id": "{id}",
            "features": {"x": {"path": "x", **spec}},
        }
    )
    with pytest.raises(UnservableRecord) as failure:
        mapping.features({"x": value}, now=NOW)
    assert "'x'" in failure.value.message
    assert "48213" not in failure.value.message
    assert "canary" not in failure.value.message


# ---------------------------------------------------------------------------- the operator


def _sealed_letter(originals: OriginalPolicy, value: bytes = ORIGINAL) -> tuple[Any, Any]:
    draft, letter = _letter(FakeMessage(value, offset_number=9), originals)
    return letter, [(name, data) for name, data in draft.headers]


def test_the_operator_opens_kept_encrypted_and_offloaded_originals() -> None:
    from sluiceway.dlq_cmd import original_of

    def nothing_stored(bucket: str, key: str) -> bytes:
        raise AssertionError("nothing to fetch")

    letter, headers = _sealed_letter(OriginalPolicy("keep"))
    assert original_of(letter, headers, [], nothing_stored) == ORIGINAL
    letter, headers = _sealed_letter(ENCRYPT)
    retired_then_current = [b"\x07" * 16, AES_KEY]
    assert original_of(letter, headers, retired_then_current, nothing_stored) == ORIGINAL
    half = "x" * (LIMITS["inline_limit"] // 2 + 10)
    large = schemas.encode(a_request({"salary": CANARY, "note": half, "more": half}))
    draft, letter = _letter(FakeMessage(large), ENCRYPT)
    stored = {("bucket", str(draft.offload_key)): draft.offload_body or b""}
    assert original_of(letter, draft.headers, [AES_KEY], lambda b, k: stored[(b, k)]) == large


def test_the_operator_is_told_why_an_original_cannot_be_given_back() -> None:
    from sluiceway.dlq_cmd import LetterError, original_of

    letter, headers = _sealed_letter(OriginalPolicy("drop"))
    with pytest.raises(LetterError, match="dropped"):
        original_of(letter, headers, [AES_KEY], lambda b, k: b"")
    letter, headers = _sealed_letter(ENCRYPT)
    with pytest.raises(PrivacyError, match="not among the keys"):
        original_of(letter, headers, [b"\x07" * 32], lambda b, k: b"")
    moved = letter.model_copy(update={"original_offset": letter.original_offset + 1})
    with pytest.raises(PrivacyError, match="altered"):
        original_of(moved, headers, [AES_KEY], lambda b, k: b"")


def test_keys_are_masked_when_shown_and_travel_whole_to_a_child_process() -> None:
    config = load_settings(
        workers={
            "dead_letter_original": "encrypt",
            "dead_letter_key": AES_KEY_TEXT,
            "dead_letter_retired_keys": [AES_KEY_TEXT],
            "pii_hash_key": "hash-key-text",
        }
    )
    shown = str(config.as_dict())
    assert AES_KEY_TEXT not in shown
    assert "hash-key-text" not in shown
    child = config.as_environment()["SLUICEWAY_WORKERS"]
    rebuilt = WorkerSettings.model_validate_json(child)
    assert rebuilt.dead_letter_retired_keys[0].get_secret_value() == AES_KEY_TEXT
    assert rebuilt.pii_hash_key is not None
