"""The consumer port on confluent-kafka: one group member, driven from one thread."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from pipeline.kafka.ports import CommitRefused, ConsumedMessage, PartitionKey, RebalanceListener

_GROUP_MOVED_ON = {
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.FENCED_INSTANCE_ID,
    KafkaError._ASSIGNMENT_LOST,
    KafkaError._STATE,
}
"""Commit errors that mean the partitions belong to someone else now, not that we failed."""


class KafkaConsumer:
    """A :class:`~pipeline.kafka.ports.ConsumerPort` over one confluent-kafka consumer."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._group_id = str(config["group.id"])
        self._consumer = Consumer(dict(config))

    @property
    def group_id(self) -> str:
        return self._group_id

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        def on_assign(_: Consumer, partitions: list[TopicPartition]) -> None:
            listener.on_assign(_keys(partitions))

        def on_revoke(_: Consumer, partitions: list[TopicPartition]) -> None:
            listener.on_revoke(_keys(partitions))

        def on_lost(_: Consumer, partitions: list[TopicPartition]) -> None:
            listener.on_lost(_keys(partitions))

        self._consumer.subscribe(
            list(topics), on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost
        )

    def fetch(self, max_records: int, timeout_s: float) -> list[ConsumedMessage]:
        # ``consume(n, timeout)`` alone would hold the first record back until n arrived or
        # the timeout passed: under light traffic that is added to every record's latency.
        first = self._consumer.poll(timeout_s)
        if first is None:
            return []
        return [first, *self._consumer.consume(max_records - 1, 0)]

    def pause(self, partitions: Collection[PartitionKey]) -> None:
        self._consumer.pause(_partitions(partitions))

    def resume(self, partitions: Collection[PartitionKey]) -> None:
        self._consumer.resume(_partitions(partitions))

    def commit(self, offsets: Mapping[PartitionKey, int]) -> None:
        if not offsets:
            return
        partitions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            committed = self._consumer.commit(offsets=partitions, asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() in _GROUP_MOVED_ON:
                raise CommitRefused(f"commit refused: {error.str()}") from exc
            raise
        failed = [tp for tp in committed or () if tp.error is not None]
        if failed:
            raise CommitRefused(f"commit refused for {_keys(failed)}: {failed[0].error}")

    def positions(self, partitions: Collection[PartitionKey]) -> dict[PartitionKey, int]:
        found = self._consumer.position(_partitions(partitions))
        return {(tp.topic, tp.partition): tp.offset for tp in found}

    def group_metadata(self) -> Any:
        return self._consumer.consumer_group_metadata()

    def close(self) -> None:
        self._consumer.close()


def _keys(partitions: Sequence[TopicPartition]) -> list[PartitionKey]:
    return [(tp.topic, tp.partition) for tp in partitions]


def _partitions(keys: Collection[PartitionKey]) -> list[TopicPartition]:
    return [TopicPartition(topic, partition) for topic, partition in sorted(keys)]
