"""An asyncio face on confluent-kafka's producer: ``await send(...)`` resolves on the broker's ack.

librdkafka delivers acknowledgements through callbacks fired from ``poll()``; one background
thread polls and hands each outcome to the event loop that asked, so a coroutine can await
exactly the acknowledgement it needs before it lets an offset be committed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import Message, Producer

from pipeline.kafka.exceptions import KafkaError

Headers = Sequence[tuple[str, bytes]]


class DeliveryError(KafkaError):
    """The broker did not acknowledge a message."""

    def __init__(self, topic: str, error: RdKafkaError) -> None:
        super().__init__(f"delivery to {topic!r} failed: {error.str()}")
        self.topic = topic
        self.retriable = bool(error.retriable())


class AsyncProducer:
    """Owns one confluent-kafka producer and the thread that serves its callbacks."""

    def __init__(self, config: dict[str, Any], poll_interval_s: float = 0.05) -> None:
        self._producer = Producer(config)
        self._poll_interval_s = poll_interval_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._poll_forever, name="producer-poll", daemon=True
        )
        self._thread.start()

    @property
    def raw(self) -> Producer:
        """The underlying producer, for transactional calls."""
        return self._producer

    def _poll_forever(self) -> None:
        while not self._stopping.is_set():
            self._producer.poll(self._poll_interval_s)

    def submit(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | str | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> asyncio.Future[Message]:
        """Produce one message; the returned future resolves on the broker's acknowledgement.

        A plain call, not a coroutine, so a batch of results costs one future each rather
        than one task each. When librdkafka's local queue is full, this waits for it to
        drain (back-pressure) before queueing.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Message] = loop.create_future()

        def on_delivery(error: RdKafkaError | None, message: Message) -> None:
            outcome = DeliveryError(topic, error) if error is not None else message
            loop.call_soon_threadsafe(_settle, future, outcome)

        kwargs: dict[str, Any] = {
            "key": key,
            "headers": list(headers or ()),
            "on_delivery": on_delivery,
        }
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._producer.produce(topic, value, **kwargs)
                return future
            except BufferError:
                self._producer.poll(self._poll_interval_s)

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | str | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> Message:
        """Produce one message and wait for the broker's acknowledgement."""
        return await self.submit(topic, value, key=key, headers=headers, partition=partition)

    def flush(self, timeout_s: float) -> int:
        """Wait for every queued message; return how many are still undelivered."""
        return int(self._producer.flush(timeout_s))

    def close(self, timeout_s: float = 30.0) -> int:
        remaining = self.flush(timeout_s)
        self._stopping.set()
        self._thread.join(timeout=5)
        return remaining


def _settle(future: asyncio.Future[Message], outcome: Message | DeliveryError) -> None:
    if future.done():
        return
    if isinstance(outcome, DeliveryError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
