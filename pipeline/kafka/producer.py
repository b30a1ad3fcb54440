"""An asyncio face on confluent-kafka's producer: ``await send(...)`` resolves on the broker's ack.

librdkafka delivers acknowledgements through callbacks fired from ``poll()``; one background
thread polls and hands each outcome to the event loop that asked, so a coroutine can await
exactly the acknowledgement it needs before it lets an offset be committed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import KafkaException, Message, Producer, TopicPartition

from pipeline.kafka.exceptions import DeliveryError

__all__ = ["AsyncProducer", "DeliveryError", "OutgoingMessage"]

Headers = Sequence[tuple[str, bytes]]


class AsyncProducer:
    """Owns one confluent-kafka producer and the thread that serves its callbacks."""

    def __init__(
        self, producer: Producer | Mapping[str, Any], poll_interval_s: float = 0.05
    ) -> None:
        """Take over ``producer`` (built by :mod:`pipeline.kafka.clients`).

        A configuration mapping is still accepted and turned into a producer as it is, for
        callers not yet moved to the factory.
        """
        self._producer = producer if isinstance(producer, Producer) else Producer(dict(producer))
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

    def submit_all(self, messages: Sequence[OutgoingMessage]) -> asyncio.Future[int]:
        """Produce several messages; the future resolves once the broker acknowledged them all.

        One future and one wake-up of the event loop per call instead of per message: the
        worker acknowledges a whole micro-batch of outcomes at once. The first failed delivery
        fails the future with its :class:`DeliveryError`.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        if not messages:
            future.set_result(0)
            return future
        acks = _BatchAcks(loop, future, len(messages))
        for message in messages:
            headers: Any = list(message.headers) if message.headers else None
            while True:
                try:
                    self._producer.produce(
                        message.topic,
                        message.value,
                        key=message.key,
                        headers=headers,
                        on_delivery=acks.on_delivery,
                    )
                    break
                except BufferError:
                    self._producer.poll(self._poll_interval_s)
                except KafkaException as exc:
                    # Refused before it was queued (too large, an invalid topic): this batch
                    # fails like a failed delivery, never with an exception in the caller.
                    acks.on_delivery(exc.args[0], _Refused(message.topic))
                    break
        return future

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | str | None = None,
        headers: Headers | None = None,
    ) -> None:
        """Produce one message and wait for the broker's acknowledgement."""
        await self.submit_all([OutgoingMessage(topic, value, key, headers)])

    def init_transactions(self, timeout_s: float) -> None:
        self._producer.init_transactions(timeout_s)

    def begin_transaction(self) -> None:
        self._producer.begin_transaction()

    def commit_offsets_in_transaction(
        self, offsets: Sequence[tuple[Mapping[tuple[str, int], int], Any]], timeout_s: float
    ) -> None:
        """Send each group's offsets into the open transaction, commit it, begin the next.

        One transaction may carry the offsets of several consumer groups (a worker serving
        several models has one group per model), so their results and offsets commit together.
        """
        for positions, group_metadata in offsets:
            partitions = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
            self._producer.send_offsets_to_transaction(partitions, group_metadata, timeout_s)
        self._producer.commit_transaction(timeout_s)
        self._producer.begin_transaction()

    def flush(self, timeout_s: float) -> int:
        """Wait for every queued message; return how many are still undelivered."""
        return int(self._producer.flush(timeout_s))

    def close(self, timeout_s: float = 30.0) -> int:
        remaining = self.flush(timeout_s)
        self._stopping.set()
        self._thread.join(timeout=5)
        return remaining


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    topic: str
    value: bytes
    key: bytes | str | None = None
    headers: Headers | None = None


class _BatchAcks:
    """Counts one batch's acknowledgements; settles its future once, from any thread."""

    __slots__ = ("_count", "_failed", "_future", "_lock", "_loop", "_remaining")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[int], count: int
    ) -> None:
        self._loop = loop
        self._future = future
        self._count = count
        self._remaining = count
        self._failed = False
        # Callbacks fire on the poll thread, and on the loop's thread while ``produce``
        # waits for queue space, so the count needs a lock.
        self._lock = threading.Lock()

    def on_delivery(self, error: RdKafkaError | None, message: Message | _Refused) -> None:
        with self._lock:
            if self._failed:
                return
            if error is not None:
                self._failed = True
                outcome: int | DeliveryError = DeliveryError.reported(str(message.topic()), error)
            else:
                self._remaining -= 1
                if self._remaining:
                    return
                outcome = self._count
        self._loop.call_soon_threadsafe(_settle_batch, self._future, outcome)


def _settle_batch(future: asyncio.Future[int], outcome: int | DeliveryError) -> None:
    if future.done():
        return
    if isinstance(outcome, DeliveryError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class _Refused:
    """Stands in for the message a delivery callback names, for a produce refused at once."""

    def __init__(self, topic: str) -> None:
        self._topic = topic

    def topic(self) -> str:
        return self._topic
