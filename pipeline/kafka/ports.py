"""The seams between the worker's policy and Kafka: a consumer port and a producer port.

The worker talks to Kafka only through these two small protocols. ``pipeline/kafka/consumer.py``
and ``pipeline/kafka/producer.py`` implement them on confluent-kafka; ``tests/unit/memory_kafka.py``
implements them in memory, so commit, pause, rebalance and back-pressure policy runs in
milliseconds without a broker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Collection, Mapping, Sequence
from typing import Any, Protocol

from pipeline.kafka.exceptions import KafkaError
from pipeline.kafka.producer import OutgoingMessage

PartitionKey = tuple[str, int]
"""(topic, partition)."""


class CommitRefused(KafkaError):
    """The group moved on (a rebalance, a fenced generation, a lost member): the commit did
    not happen, and the partitions' records are redelivered to their new owner. Not an error
    of the worker's: it drops what it held for those partitions and carries on."""


class ConsumedMessage(Protocol):
    """What the worker reads of a consumed record (confluent-kafka's ``Message`` fits)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> str | bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> Any: ...
    def timestamp(self) -> tuple[int, int]: ...
    def error(self) -> Any: ...


class RebalanceListener(Protocol):
    """Told, on the consumer's own thread, when partitions come and go."""

    def on_assign(self, partitions: Sequence[PartitionKey]) -> None: ...

    def on_revoke(self, partitions: Sequence[PartitionKey]) -> None:
        """Partitions are handed over in order: finish and commit their work first."""
        ...

    def on_lost(self, partitions: Sequence[PartitionKey]) -> None:
        """Partitions were taken without a handover: their work may no longer be committed."""
        ...


class ConsumerPort(Protocol):
    """One group member. Every call is made from one thread (the consumer's)."""

    @property
    def group_id(self) -> str: ...

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None: ...

    def fetch(self, max_records: int, timeout_s: float) -> list[ConsumedMessage]:
        """Records as soon as one is there (up to ``max_records``), or none after the timeout."""
        ...

    def pause(self, partitions: Collection[PartitionKey]) -> None: ...

    def resume(self, partitions: Collection[PartitionKey]) -> None: ...

    def commit(self, offsets: Mapping[PartitionKey, int]) -> None:
        """Commit synchronously; raises :class:`CommitRefused` when the group moved on."""
        ...

    def positions(self, partitions: Collection[PartitionKey]) -> dict[PartitionKey, int]: ...

    def group_metadata(self) -> Any:
        """For ``send_offsets_to_transaction`` in exactly-once mode."""
        ...

    def close(self) -> None: ...


class ProducerPort(Protocol):
    """Produces outcomes; a future per call settles once the broker acknowledged them all."""

    def submit_all(self, messages: Sequence[OutgoingMessage]) -> Awaitable[int]: ...

    def init_transactions(self, timeout_s: float) -> None: ...

    def begin_transaction(self) -> None: ...

    def commit_offsets_in_transaction(
        self, offsets: Sequence[tuple[Mapping[PartitionKey, int], Any]], timeout_s: float
    ) -> None:
        """Send each group's offsets into the open transaction, commit it, begin the next."""
        ...

    def close(self, timeout_s: float) -> int: ...
