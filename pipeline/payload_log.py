"""Payload logging: a sampled share of a model's request/response pairs, kept for later study.

Per model, ``payload_log_rate`` (0 to 1) and ``payload_log_sink`` (``topic:<name>`` or
``prefix:<key prefix>`` in the object store's bucket) in ``models.<m>``. Which requests are
logged is decided by a hash of the request id (:func:`sampled`), not by a random draw: every
worker and every retry logs the same requests, and a test can count exactly which it expects.

What is logged honours the model's ``pii`` policy: the request's features pass through the
same :class:`~pipeline.privacy.FeaturePolicy` as the result's echoed features, and the
response is the segment record the worker already built under that policy.

Logging is a side output: a sink that fails costs a warning and a count, never a record's
outcome, and never holds up its offset (outcomes are acknowledged before the log is written).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import orjson

from pipeline.kafka.producer import OutgoingMessage
from pipeline.privacy import NO_POLICY, FeaturePolicy
from pipeline.settings import Settings
from pipeline.storage.segments import path_segment
from schemas.models import InferenceRequest

log = logging.getLogger("sluiceway.payload_log")

_HASH_SPACE = 2**64
PAYLOAD_HEADERS = [("content-type", b"application/json"), ("sluiceway-kind", b"payload-log")]


def sampled(request_id: str, rate: float) -> bool:
    """Whether the request with ``request_id`` is logged at ``rate``: its hash, read as a
    number in [0, 1), is below the rate. Each id is in or out for good; over many ids the
    share logged is ``rate`` (a keyed hash is not needed: ids are not secrets)."""
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(request_id.encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") < rate * _HASH_SPACE


@dataclass(frozen=True, slots=True)
class PayloadSink:
    kind: Literal["topic", "prefix"]
    where: str


def parse_sink(text: str) -> PayloadSink:
    """``topic:<name>`` or ``prefix:<key prefix>``; raises ``ValueError`` otherwise."""
    kind, _, where = text.partition(":")
    if kind == "topic" and where:
        return PayloadSink("topic", where)
    if kind == "prefix" and where.strip("/"):
        return PayloadSink("prefix", where.strip("/"))
    raise ValueError(f"payload log sink {text[:60]!r} is neither topic:<name> nor prefix:<key>")


def request_view(request: InferenceRequest, policy: FeaturePolicy = NO_POLICY) -> dict[str, Any]:
    """A request's inputs as a payload log may carry them."""
    inputs = request.inputs
    view: dict[str, Any] = {}
    if inputs.features is not None:
        view["features"] = policy.features(inputs.features)
    if inputs.text is not None:
        view["text"] = inputs.text.model_dump(mode="json")
    if inputs.tensors is not None:
        view["tensors"] = [
            {
                "name": t.name,
                "datatype": t.datatype.value,
                "shape": list(t.shape),
                "base64": base64.b64encode(t.data).decode(),
            }
            for t in inputs.tensors
        ]
    return view


def payload_entry(
    request: InferenceRequest,
    response: Mapping[str, Any],
    *,
    model: str,
    version: str,
    logged_at: datetime,
    policy: FeaturePolicy = NO_POLICY,
) -> dict[str, Any]:
    """One logged pair."""
    return {
        "request_id": str(request.request_id),
        "correlation_id": request.correlation_id,
        "model": model,
        "model_version": version,
        "logged_at": logged_at.isoformat(),
        "request": request_view(request, policy),
        "response": dict(response),
    }


def object_key(
    prefix: str, model: str, version: str, logged_at: datetime, ids: Sequence[str]
) -> str:
    """Where one batch's pairs are stored: derived from the ids, so a retried batch
    overwrites its own object instead of writing a second one."""
    digest = hashlib.blake2b("\n".join(ids).encode(), digest_size=16).hexdigest()
    day = logged_at.strftime("%Y/%m/%d")
    return f"{prefix}/{path_segment(model)}/{path_segment(version)}/{day}/{digest}.jsonl"


class ObjectPutter(Protocol):
    async def put_bytes(self, key: str, body: bytes, content_type: str) -> str: ...


class Submitter(Protocol):
    """What the logger needs of a producer (the worker's ``ProducerPort`` fits)."""

    def submit_all(self, messages: Sequence[OutgoingMessage]) -> Awaitable[int]: ...


class PayloadLogger:
    """Writes the sampled pairs of served batches to each model's sink."""

    def __init__(
        self,
        settings: Settings,
        producer: Submitter,
        store: ObjectPutter,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._models = settings.models
        self._producer = producer
        self._store = store
        self._now = now
        self.logged = 0
        self.failed = 0

    def logs(self, model: str) -> bool:
        """Whether ``model`` has a payload log (asked before a batch's pairs are gathered)."""
        settings = self._models.get(model)
        return settings is not None and settings.payload_log_sink is not None

    async def served(
        self,
        model: str,
        version: str,
        requests: Sequence[InferenceRequest],
        responses: Sequence[Mapping[str, Any]],
        policy: FeaturePolicy = NO_POLICY,
    ) -> int:
        """Log the sampled pairs of one served batch; returns how many were logged."""
        settings = self._models.get(model)
        if settings is None or settings.payload_log_sink is None:
            return 0
        rate = settings.payload_log_rate
        chosen = [
            (request, response)
            for request, response in zip(requests, responses, strict=True)
            if sampled(str(request.request_id), rate)
        ]
        if not chosen:
            return 0
        moment = datetime.fromtimestamp(self._now(), tz=UTC)
        entries = [
            payload_entry(r, out, model=model, version=version, logged_at=moment, policy=policy)
            for r, out in chosen
        ]
        try:
            await self._write(
                parse_sink(settings.payload_log_sink), model, version, moment, entries
            )
        except Exception as error:  # a side output: it never costs a record its outcome
            self.failed += len(entries)
            log.warning(
                'payload log failed model="%s" pairs="%d" error="%s"',
                model,
                len(entries),
                type(error).__name__,
            )
            return 0
        self.logged += len(entries)
        return len(entries)

    async def _write(
        self,
        sink: PayloadSink,
        model: str,
        version: str,
        moment: datetime,
        entries: Sequence[dict[str, Any]],
    ) -> None:
        if sink.kind == "topic":
            await self._producer.submit_all(
                [
                    OutgoingMessage(
                        sink.where, orjson.dumps(e), e["request_id"].encode(), PAYLOAD_HEADERS
                    )
                    for e in entries
                ]
            )
            return
        ids = [e["request_id"] for e in entries]
        body = b"".join(orjson.dumps(e) + b"\n" for e in entries)
        key = object_key(sink.where, model, version, moment, ids)
        await self._store.put_bytes(key, body, "application/x-ndjson")
