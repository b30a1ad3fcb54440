"""Salesforce Pub/Sub API over gRPC: Subscribe with flow control, GetTopic, GetSchema, Avro.

The protocol is Salesforce's public ``pubsub_api.proto`` (vendored in ``proto/``). Two pure
pieces keep the bookkeeping testable without a server:

- :class:`CreditWindow`: flow control. The client grants ``num_requested`` credits; the
  server sends at most that many events. Credits are topped up only after the events
  received so far were handled, so at most one window of events is ever requested and
  unhandled at once.
- :func:`replay_start`: where a subscription starts. A stored replay id resumes with
  ``CUSTOM`` (the events *after* it); without one, the configured preset. A rejected replay id
  raises :class:`ReplayIdRejectedError`, and nothing here ever falls back to ``LATEST``.

:class:`PubSubClient` is the I/O edge: one gRPC channel, the three authentication headers
Salesforce asks for (``accesstoken``, ``instanceurl``, ``tenantid``), schemas cached by id,
and every ``grpc.RpcError`` turned into one of our errors with the ``error-code`` trailer.
"""

from __future__ import annotations

import io
import json
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Literal

import fastavro
import grpc

from connectors.salesforce.exceptions import (
    PubSubError,
    ReplayIdRejectedError,
)
from connectors.salesforce.proto import pubsub_api_pb2 as pb

SERVICE = "/eventbus.v1.PubSub"
REPLAY_ERROR_CODES = (
    "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted",
    "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.invalid",
)
"""``error-code`` trailers that mean the replay id cannot be resumed from."""
_TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNAUTHENTICATED,  # an expired session: authenticate, resubscribe
    }
)

ReplayPresetName = Literal["LATEST", "EARLIEST", "CUSTOM"]


# ---------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class ReplayStart:
    preset: ReplayPresetName
    replay_id: bytes = b""

    def __post_init__(self) -> None:
        if (self.preset == "CUSTOM") != bool(self.replay_id):
            raise ValueError("a replay id goes with CUSTOM, and CUSTOM needs one")


def replay_start(stored: bytes | None, default: Literal["LATEST", "EARLIEST"]) -> ReplayStart:
    """Resume after the stored replay id, or start at the configured preset."""
    return ReplayStart("CUSTOM", stored) if stored else ReplayStart(default)


class CreditWindow:
    """``num_requested`` bookkeeping for one Subscribe stream.

    ``size`` credits are granted at first; after each response is handled, :meth:`top_up`
    grants what brings the outstanding credits back to ``size`` once they fell to
    ``refill_at`` or below (half the window by default: fewer, larger FetchRequests).
    """

    def __init__(self, size: int, refill_at: int | None = None) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.refill_at = size // 2 if refill_at is None else refill_at
        if not 0 <= self.refill_at < size:
            raise ValueError(f"refill_at must be in [0, {size}), got {self.refill_at}")
        self.outstanding = 0

    def open(self) -> int:
        """Credits for the first FetchRequest of a (new) stream."""
        self.outstanding = self.size
        return self.size

    def on_response(self, delivered: int) -> None:
        """Account for the events a response delivered.

        The response's ``pending_num_requested`` is deliberately not used: it reflects the
        server's count when it sent the response, before any FetchRequest still on the way, so
        trusting it would grant those credits twice and let the window grow without bound.
        """
        self.outstanding = max(0, self.outstanding - delivered)

    def top_up(self) -> int:
        """Credits to request now (0: none needed yet)."""
        if self.outstanding > self.refill_at:
            return 0
        granted = self.size - self.outstanding
        self.outstanding = self.size
        return granted


def error_from_rpc(error: grpc.RpcError, what: str) -> PubSubError:
    """The most specific of our errors for a failed call, keeping Salesforce's error code."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    trailers: dict[str, str] = {}
    if isinstance(error, grpc.Call):
        for key, value in error.trailing_metadata() or ():
            trailers[key] = value if isinstance(value, str) else value.decode("utf-8", "replace")
    error_code = trailers.get("error-code")
    message = f"{what}: {code.name} {details or ''} (error-code {error_code or '-'})".strip()
    if error_code is not None and error_code in REPLAY_ERROR_CODES:
        return ReplayIdRejectedError(message, code=code.name, error_code=error_code)
    if code in _TRANSIENT_CODES:
        return PubSubError(message, code=code.name, error_code=error_code, transient=True)
    return PubSubError(message, code=code.name, error_code=error_code)


# ---------------------------------------------------------------------------- I/O edge


@dataclass(frozen=True)
class PubSubSession:
    """What the Pub/Sub API needs to know who calls: the OAuth session and its org."""

    access_token: str
    instance_url: str
    tenant_id: str

    def __repr__(self) -> str:  # the token must never reach a log
        return f"PubSubSession(instance_url={self.instance_url!r}, tenant_id={self.tenant_id!r})"

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (
            ("accesstoken", self.access_token),
            ("instanceurl", self.instance_url),
            ("tenantid", self.tenant_id),
        )


@dataclass(frozen=True)
class TopicInfo:
    topic_name: str
    schema_id: str
    can_subscribe: bool


@dataclass(frozen=True)
class EventSchema:
    schema_id: str
    document: dict[str, Any]
    """The schema as parsed JSON: field positions decode the CDC bitmaps."""
    parsed: Any
    """fastavro's parsed form, for decoding payloads."""


@dataclass(frozen=True)
class ReceivedEvent:
    replay_id: bytes
    event_id: str
    schema: EventSchema
    payload: dict[str, Any] | None
    """The decoded record; ``None`` when it did not decode (``error`` says why)."""
    raw: bytes = b""
    error: str | None = None


@dataclass(frozen=True)
class FetchBatch:
    events: list[ReceivedEvent]
    latest_replay_id: bytes
    pending_num_requested: int


class PubSubClient:
    """One channel to the Pub/Sub API; ``session`` is asked for credentials on every call,
    so a refreshed token is used by the next call."""

    def __init__(
        self, channel: grpc.Channel, session: Callable[[], PubSubSession], timeout_s: float = 30.0
    ) -> None:
        self._channel = channel
        self._session = session
        self._timeout_s = timeout_s
        self._schemas: dict[str, EventSchema] = {}
        self._schemas_lock = threading.Lock()
        self._get_topic = channel.unary_unary(
            f"{SERVICE}/GetTopic",
            request_serializer=pb.TopicRequest.SerializeToString,
            response_deserializer=pb.TopicInfo.FromString,
        )
        self._get_schema = channel.unary_unary(
            f"{SERVICE}/GetSchema",
            request_serializer=pb.SchemaRequest.SerializeToString,
            response_deserializer=pb.SchemaInfo.FromString,
        )
        self._subscribe = channel.stream_stream(
            f"{SERVICE}/Subscribe",
            request_serializer=pb.FetchRequest.SerializeToString,
            response_deserializer=pb.FetchResponse.FromString,
        )

    def get_topic(self, topic_name: str) -> TopicInfo:
        try:
            info = self._get_topic(
                pb.TopicRequest(topic_name=topic_name),
                metadata=self._session().metadata(),
                timeout=self._timeout_s,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"GetTopic {topic_name}") from exc
        return TopicInfo(info.topic_name, info.schema_id, info.can_subscribe)

    def schema(self, schema_id: str) -> EventSchema:
        """The event schema with this id (fetched once, then cached: ids are fingerprints)."""
        with self._schemas_lock:
            cached = self._schemas.get(schema_id)
        if cached is not None:
            return cached
        try:
            info = self._get_schema(
                pb.SchemaRequest(schema_id=schema_id),
                metadata=self._session().metadata(),
                timeout=self._timeout_s,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"GetSchema {schema_id}") from exc
        document = json.loads(info.schema_json)
        schema = EventSchema(schema_id, document, fastavro.parse_schema(document))
        with self._schemas_lock:
            self._schemas[schema_id] = schema
        return schema

    def decode(self, event: pb.ConsumerEvent) -> ReceivedEvent:
        """The event with its payload decoded; a payload that does not decode comes back
        with ``payload=None`` and the reason, so one bad event never breaks the stream."""
        schema = self.schema(event.event.schema_id)
        raw = bytes(event.event.payload)
        received = ReceivedEvent(bytes(event.replay_id), event.event.id, schema, None, raw)
        try:
            payload = fastavro.schemaless_reader(io.BytesIO(raw), schema.parsed)
        except (ValueError, EOFError, IndexError, TypeError, UnicodeDecodeError) as exc:
            error = f"does not decode with schema {schema.schema_id}: {exc}"
            return replace(received, error=error)
        if not isinstance(payload, dict):
            return replace(received, error="the payload is not a record")
        return replace(received, payload=payload)

    def subscribe(self, topic_name: str, start: ReplayStart, credits: int) -> Subscription:
        """Open a Subscribe stream; the first FetchRequest carries the replay start."""
        first = pb.FetchRequest(
            topic_name=topic_name,
            replay_preset=pb.ReplayPreset.Value(start.preset),
            replay_id=start.replay_id,
            num_requested=credits,
        )
        return Subscription(self, topic_name, first)

    def _open_stream(self, requests: Iterator[pb.FetchRequest]) -> Any:
        return self._subscribe(requests, metadata=self._session().metadata())

    def close(self) -> None:
        self._channel.close()


_END = object()


class Subscription:
    """A live Subscribe stream: iterate over :class:`FetchBatch` es, grant more credits with
    :meth:`request`. Closing it cancels the call."""

    def __init__(self, client: PubSubClient, topic_name: str, first: pb.FetchRequest) -> None:
        self._client = client
        self.topic_name = topic_name
        self._requests: queue.Queue[object] = queue.Queue()
        self._requests.put(first)
        self._closed = False
        self._call = client._open_stream(self._outgoing())

    def _outgoing(self) -> Iterator[pb.FetchRequest]:
        while True:
            item = self._requests.get()
            if item is _END:
                return
            assert isinstance(item, pb.FetchRequest)
            yield item

    def request(self, credits: int) -> None:
        """Ask for ``credits`` more events (topic name omitted, as the protocol allows)."""
        if credits > 0:
            self._requests.put(pb.FetchRequest(num_requested=credits))

    def __iter__(self) -> Iterator[FetchBatch]:
        try:
            for response in self._call:
                events = [self._client.decode(event) for event in response.events]
                yield FetchBatch(
                    events, bytes(response.latest_replay_id), response.pending_num_requested
                )
        except grpc.RpcError as exc:
            if self._closed:
                return  # we cancelled it
            raise error_from_rpc(exc, f"Subscribe {self.topic_name}") from exc

    def close(self) -> None:
        self._closed = True
        self._requests.put(_END)
        self._call.cancel()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
