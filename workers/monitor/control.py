"""The monitor's view of ``<ns>.control``: the routing table, with every idempotency key seen.

Like the workers' follower it reads the compacted topic from the beginning without a consumer
group. Two things differ. Each decision keeps the event's ``idempotency_key``, so the monitor can
tell a rollback it already emitted. And it knows when it has read everything the topic held when
it started (``caught_up``): until then the monitor judges no window, because a monitor killed
after emitting a rollback and before forgetting the window judges that window again on restart,
and must first see that the rollback is already there.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

import schemas
from pipeline.kafka import clients
from pipeline.kafka.clients import ConsumerRole
from pipeline.routing import RoutingTable
from pipeline.settings import KafkaSettings
from schemas.exceptions import DecodeError
from schemas.models import ControlEvent
from workers.inference.control import to_decision

log = logging.getLogger("sluiceway.monitor")


class ControlLog:
    def __init__(self, kafka: KafkaSettings, topic: str, routing: RoutingTable) -> None:
        self.topic = topic
        self.routing = routing
        self._consumer = clients.consumer(
            kafka,
            group_id=clients.throwaway_group("sluiceway-monitor-control"),
            role=ConsumerRole.READER,
        )
        metadata = self._consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions) if topic in metadata.topics else []
        self._ends: dict[int, int] = {}
        for partition in partitions:
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=10
            )
            if high > low:
                self._ends[partition] = high
        self._positions: dict[int, int] = {}
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])

    @property
    def caught_up(self) -> bool:
        """Whether every event the topic held at start has been folded in."""
        behind = [p for p, end in self._ends.items() if self._positions.get(p, -1) < end]
        if behind:  # offsets a compaction removed are skipped: ask where the consumer is
            at = self._consumer.position([TopicPartition(self.topic, p) for p in behind])
            for tp in at:
                if tp.offset >= 0:
                    self._positions[tp.partition] = max(
                        self._positions.get(tp.partition, 0), tp.offset
                    )
        return all(self._positions.get(p, -1) >= end for p, end in self._ends.items())

    def catch_up(self, timeout_s: float) -> bool:
        """Read until ``caught_up`` or ``timeout_s`` has passed; return ``caught_up``."""
        deadline = time.monotonic() + timeout_s
        while not self.caught_up and time.monotonic() < deadline:
            self.poll(0.2)
        return self.caught_up

    def poll(self, timeout_s: float = 0.0) -> int:
        """Fold every control event available now; return how many changed the table."""
        changed = 0
        for message in self._consumer.consume(100, timeout_s):
            if message.error() is not None:
                continue
            partition, offset = message.partition(), message.offset()
            if partition is not None and offset is not None:
                self._positions[partition] = max(self._positions.get(partition, 0), offset + 1)
            if not message.value():
                continue
            try:
                event = schemas.decode(message.value() or b"", ControlEvent)
                decision = dataclasses.replace(
                    to_decision(event), idempotency_key=event.idempotency_key
                )
            except (DecodeError, ValueError) as error:
                log.warning('control event skipped offset="%s" error="%s"', offset, error)
                continue
            if self.routing.apply(decision):
                changed += 1
                log.info(
                    'route model="%s" action="%s" version="%s" key="%s"',
                    decision.model,
                    decision.action.value,
                    decision.version,
                    decision.idempotency_key,
                )
        return changed

    def close(self) -> None:
        self._consumer.close()
