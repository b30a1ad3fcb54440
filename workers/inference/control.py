"""Following ``<ns>.control``: control events become routing decisions in every worker.

The topic is compacted with the model as key, so reading it from the beginning at start-up
restores the current routing; later events arrive within one poll of the worker loop.
"""

from __future__ import annotations

import logging

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

import schemas
from pipeline.kafka import clients
from pipeline.kafka.clients import ConsumerRole
from pipeline.routing import RouteAction, RouteDecision, RoutingTable
from pipeline.settings import KafkaSettings
from schemas.exceptions import DecodeError
from schemas.models import ControlAction, ControlEvent

log = logging.getLogger("sluiceway.control")

MONITOR_ISSUER = "monitor"


def to_decision(event: ControlEvent) -> RouteDecision:
    """Map a contract event onto the routing table's decision (pure)."""
    manual = event.issued_by is not None and not event.issued_by.startswith(MONITOR_ISSUER)
    issued_at_ms = int(event.issued_at.timestamp() * 1000)
    if event.action is ControlAction.CANARY:
        assert event.split is not None  # the contract requires a split for a canary
        total = sum(part.weight for part in event.split)
        stable = event.from_version or max(event.split, key=lambda part: part.weight).version
        canary = next((part for part in event.split if part.version != stable), None)
        return RouteDecision(
            model=event.model,
            action=RouteAction.CANARY,
            version=stable,
            canary_version=canary.version if canary else None,
            canary_fraction=(canary.weight / total) if canary else 0.0,
            issued_at_ms=issued_at_ms,
            manual=manual,
            reason=event.reason,
            idempotency_key=event.idempotency_key,
        )
    return RouteDecision(
        model=event.model,
        action=RouteAction(event.action.value),
        version=event.to_version,
        issued_at_ms=issued_at_ms,
        manual=manual,
        reason=event.reason,
        idempotency_key=event.idempotency_key,
    )


class ControlFollower:
    """Reads the control topic without a consumer group (every worker reads all of it)."""

    def __init__(self, kafka: KafkaSettings, topic: str, routing: RoutingTable) -> None:
        self.topic = topic
        self.routing = routing
        group_id = clients.throwaway_group("sluiceway-control")
        self._consumer = clients.consumer(kafka, group_id=group_id, role=ConsumerRole.READER)
        metadata = self._consumer.list_topics(topic, timeout=10)
        partitions = metadata.topics[topic].partitions if topic in metadata.topics else {}
        self._consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(partitions)]
        )

    def poll(self, timeout_s: float = 0.0) -> int:
        """Apply every control event available now; return how many changed the table."""
        changed = 0
        for message in self._consumer.consume(100, timeout_s):
            if message.error() is not None or not message.value():
                continue
            try:
                event = schemas.decode(message.value() or b"", ControlEvent)
                decision = to_decision(event)
            except (DecodeError, ValueError) as error:
                log.warning('control event skipped offset="%s" error="%s"', message.offset(), error)
                continue
            if self.routing.apply(decision):
                changed += 1
                log.info(
                    'route model="%s" action="%s" version="%s" reason="%s"',
                    decision.model,
                    decision.action.value,
                    decision.version,
                    decision.reason,
                )
        return changed

    def close(self) -> None:
        self._consumer.close()
