"""The client SDK: publish requests, ask and wait for one result, follow a model's results.

``SluicewayClient`` is synchronous and thread-safe; ``AsyncSluicewayClient`` offers the same on
asyncio. One client owns one idempotent producer and, once ``infer`` is first used, one reply
consumer on its own reply topic (``<ns>.replies.<client id>``): every ``infer`` call of the
client shares it, and results are handed to the waiting call by request id. Workers answer on a
request's ``reply_to`` in addition to the model's results topic.

Errors are typed: :class:`BrokerUnavailableError` when Kafka cannot be reached in time,
:class:`DeliveryError` when the broker refused a request, :class:`InferTimeoutError` when no
result came back in time, :class:`RequestFailedError` (carrying the result) when the result
is not ``ok``.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from types import TracebackType

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

import schemas
from pipeline import tracing
from pipeline.kafka import clients
from pipeline.kafka.admin import TopicSpec, ensure_topics
from pipeline.kafka.clients import ConsumerRole, ProducerRole
from pipeline.kafka.events import follow
from pipeline.kafka.exceptions import ClientError, DeliveryError
from pipeline.settings import Settings
from pipeline.topics import ModelTopics
from schemas.errors import SluicewayError
from schemas.identity import message_key, request_id_for
from schemas.models import InferenceRequest, InferenceResult, ResultStatus
from schemas.rendering import readable

__all__ = [
    "AsyncSluicewayClient",
    "BrokerUnavailableError",
    "ClientError",
    "DeliveryError",
    "InferTimeoutError",
    "Receipt",
    "RequestFailedError",
    "SluicewayClient",
    # The request identity and result rendering live with the contracts (schemas/); the SDK
    # offers them too, since a publisher needs both.
    "readable",
    "request_id_for",
]

REPLY_RETENTION_MS = 60 * 60 * 1000
"""Replies are for the client that waits now; an hour is plenty."""
_UNREACHABLE = {
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._MSG_TIMED_OUT,
    KafkaError._TIMED_OUT,
}


class BrokerUnavailableError(ClientError):
    """Kafka could not be reached (or did not acknowledge) within the timeout."""

    transient = True


class InferTimeoutError(ClientError, TimeoutError):
    """No result for the request within the timeout (it may still be served later)."""


class RequestFailedError(ClientError):
    """The request was answered, but not with ``ok``: the result says why."""

    def __init__(self, result: InferenceResult) -> None:
        super().__init__(
            f"request {result.request_id} {result.status.value}: "
            f"{result.error_code or ''} {result.error_message or ''}".strip()
        )
        self.result = result


@dataclass(frozen=True)
class Receipt:
    """Where the broker stored a published request."""

    request_id: str
    topic: str
    partition: int
    offset: int


class SluicewayClient:
    def __init__(self, settings: Settings, *, client_id: str | None = None) -> None:
        self.settings = settings
        self.client_id = client_id or uuid.uuid4().hex[:12]
        self._producer = clients.producer(settings.kafka, role=ProducerRole.REQUESTS)
        self._lock = threading.Lock()
        self._waiting: dict[str, Future[InferenceResult]] = {}
        self._replies: Consumer | None = None
        self._reply_thread: threading.Thread | None = None
        self._closed = threading.Event()

    @property
    def reply_topic(self) -> str:
        return f"{self.settings.namespace}.replies.{self.client_id}"

    # ------------------------------------------------------------------ publish

    def publish(self, request: InferenceRequest, timeout_s: float = 10.0) -> Receipt:
        """Publish one request and wait for the broker's acknowledgement."""
        return self.publish_many([request], timeout_s)[0]

    def publish_many(
        self, requests: Sequence[InferenceRequest], timeout_s: float = 30.0
    ) -> list[Receipt]:
        """Publish requests (each to its model's requests topic) and wait for every ack."""
        outcomes: dict[int, Receipt | KafkaError] = {}

        def delivered(index: int, request_id: str) -> Callable[[KafkaError | None, Message], None]:
            def callback(error: KafkaError | None, message: Message) -> None:
                outcomes[index] = error or Receipt(
                    request_id,
                    str(message.topic()),
                    int(message.partition() or 0),
                    int(message.offset() or 0),
                )

            return callback

        topics = {r.model: ModelTopics(self.settings.namespace, r.model).requests for r in requests}
        with tracing.publishing(requests, topics) as sent:
            for index, request in enumerate(sent):
                try:
                    self._producer.produce(
                        topics[request.model],
                        schemas.encode(request),
                        key=message_key(request),
                        headers=list(schemas.message_headers(request.AVRO_NAME)),
                        on_delivery=delivered(index, str(request.request_id)),
                    )
                except BufferError as error:
                    raise BrokerUnavailableError(f"the producer queue is full: {error}") from error
                self._producer.poll(0)
            remaining = self._producer.flush(timeout_s)
        if remaining or len(outcomes) < len(requests):
            raise BrokerUnavailableError(
                f"{len(requests) - len(outcomes)} of {len(requests)} requests not acknowledged "
                f"within {timeout_s:g}s by {self.settings.kafka.bootstrap_servers}"
            )
        receipts = []
        for index in range(len(requests)):
            outcome = outcomes[index]
            if isinstance(outcome, KafkaError):
                refused = f"request {requests[index].request_id}"
                if outcome.code() in _UNREACHABLE:
                    raise BrokerUnavailableError(f"{refused}: {outcome.str()}")
                raise DeliveryError.reported(topics[requests[index].model], outcome, refused)
            receipts.append(outcome)
        return receipts

    # ------------------------------------------------------------------ infer

    def submit(self, request: InferenceRequest, timeout_s: float = 10.0) -> Future[InferenceResult]:
        """Publish with ``reply_to`` set to this client's reply topic; the future completes
        with the result (use :meth:`infer` to wait and get typed errors)."""
        self._ensure_reply_consumer()
        asked = request.model_copy(
            update={
                "reply_to": self.reply_topic,
                "correlation_id": request.correlation_id or str(request.request_id),
            }
        )
        future: Future[InferenceResult] = Future()
        with self._lock:
            self._waiting[str(asked.request_id)] = future
        try:
            self.publish(asked, timeout_s)
        except ClientError:
            with self._lock:
                self._waiting.pop(str(asked.request_id), None)
            raise
        return future

    def infer(self, request: InferenceRequest, timeout_s: float = 30.0) -> InferenceResult:
        """Publish one request and wait for its result; raise unless it is ``ok``."""
        future = self.submit(request, min(timeout_s, 10.0))
        try:
            result: InferenceResult | None = future.result(timeout=timeout_s)
        except FutureTimeout:
            result = None
        return self.outcome(request, result, timeout_s)

    def outcome(
        self, request: InferenceRequest, result: InferenceResult | None, timeout_s: float
    ) -> InferenceResult:
        """The awaited result, or the typed error for its absence (``None``) or failure."""
        if result is None:
            with self._lock:
                self._waiting.pop(str(request.request_id), None)
            raise InferTimeoutError(
                f"no result for {request.request_id} ({request.model}) within {timeout_s:g}s"
            )
        if result.status is not ResultStatus.OK:
            raise RequestFailedError(result)
        return result

    def _ensure_reply_consumer(self) -> None:
        with self._lock:
            if self._replies is not None:
                return
            try:
                created = ensure_topics(
                    self.settings.kafka,
                    [
                        TopicSpec(
                            self.reply_topic, 1, config={"retention.ms": str(REPLY_RETENTION_MS)}
                        )
                    ],
                )
            except SluicewayError as error:
                raise BrokerUnavailableError(
                    f"cannot create {self.reply_topic}: {error}"
                ) from error
            consumer = clients.consumer(
                self.settings.kafka,
                group_id=f"sluiceway-client-{self.client_id}",
                role=ConsumerRole.READER,
            )
            # The topic is this client's own: no group coordination. A new topic is read from
            # its start; one kept from an earlier run (a stable client id) from its current
            # end, looked up now, so a reply to a request sent after this returns is never
            # skipped (OFFSET_END would be resolved later, racing the reply).
            start = OFFSET_BEGINNING
            if self.reply_topic not in created:
                _, start = consumer.get_watermark_offsets(
                    TopicPartition(self.reply_topic, 0), timeout=10
                )
            consumer.assign([TopicPartition(self.reply_topic, 0, start)])
            self._replies = consumer
            self._reply_thread = threading.Thread(
                target=self._dispatch_replies, name=f"replies-{self.client_id}", daemon=True
            )
            self._reply_thread.start()

    def _dispatch_replies(self) -> None:
        assert self._replies is not None
        for result in follow(self._replies, InferenceResult, until=self._closed.is_set):
            with self._lock:
                future = self._waiting.pop(str(result.request_id), None)
            if future is not None and not future.done():
                future.set_result(result)

    # ------------------------------------------------------------------ subscribe

    def subscribe(
        self,
        model: str,
        *,
        group: str | None = None,
        from_beginning: bool = False,
        idle_timeout_s: float | None = None,
    ) -> Iterator[InferenceResult]:
        """Iterate over a model's results. With ``group``, offsets are committed as results
        are yielded, so a restarted subscriber continues where it stopped. Stops after
        ``idle_timeout_s`` without results (never, by default)."""
        consumer = clients.consumer(
            self.settings.kafka,
            group_id=group or clients.throwaway_group("sluiceway-subscriber"),
            role=ConsumerRole.SUBSCRIBER,
            overrides={
                "auto.offset.reset": "earliest" if from_beginning else "latest",
                # Without a group of its own, nothing is remembered for a restart.
                "enable.auto.commit": group is not None,
            },
        )
        consumer.subscribe([ModelTopics(self.settings.namespace, model).results])
        try:
            # One message at a time: with a group, an offset is stored as its result is read,
            # so a subscriber that stops has not skipped results it never yielded.
            yield from follow(
                consumer,
                InferenceResult,
                until=self._closed.is_set,
                batch=1,
                poll_timeout_s=0.5,
                idle_timeout_s=idle_timeout_s,
            )
        except KafkaException as error:
            raise BrokerUnavailableError(str(error)) from error
        finally:
            consumer.close()

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._closed.set()
        if self._reply_thread is not None:
            self._reply_thread.join(5)
        if self._replies is not None:
            self._replies.close()
        self._producer.flush(5)
        with self._lock:
            for future in self._waiting.values():
                future.cancel()
            self._waiting.clear()

    def __enter__(self) -> SluicewayClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncSluicewayClient:
    """The same client on asyncio: Kafka calls run on a thread, the loop never blocks."""

    def __init__(self, settings: Settings, *, client_id: str | None = None) -> None:
        self.sync = SluicewayClient(settings, client_id=client_id)

    async def publish(self, request: InferenceRequest, timeout_s: float = 10.0) -> Receipt:
        return await asyncio.to_thread(self.sync.publish, request, timeout_s)

    async def infer(self, request: InferenceRequest, timeout_s: float = 30.0) -> InferenceResult:
        future = await asyncio.to_thread(self.sync.submit, request, min(timeout_s, 10.0))
        try:
            result: InferenceResult | None = await asyncio.wait_for(
                asyncio.wrap_future(future), timeout_s
            )
        except TimeoutError:
            result = None
        return self.sync.outcome(request, result, timeout_s)

    async def subscribe(
        self, model: str, *, group: str | None = None, from_beginning: bool = False
    ) -> AsyncIterator[InferenceResult]:
        iterator = self.sync.subscribe(model, group=group, from_beginning=from_beginning)
        done = object()
        while True:
            item = await asyncio.to_thread(next, iterator, done)
            if item is done:
                return
            assert isinstance(item, InferenceResult)
            yield item

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncSluicewayClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
