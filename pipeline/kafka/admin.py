"""Creating topics idempotently."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka import KafkaError as _RdKafkaError
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from pipeline.kafka.exceptions import TopicAdminError
from pipeline.settings import KafkaSettings
from pipeline.topics import ModelTopics, control_topic


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int = 3
    replication_factor: int = 1
    config: dict[str, str] = field(default_factory=dict)


def ensure_topics(
    kafka: KafkaSettings, topics: Iterable[TopicSpec], timeout_s: float = 15.0
) -> list[str]:
    """Create the topics that do not exist yet; return the names that were created.

    Returns only once every partition of every named topic has a leader, so the caller can
    produce, fetch offsets or consume at once (a fresh topic answers NOT_LEADER for a moment).
    """
    specs = list(topics)
    if not specs:
        return []
    admin = AdminClient(kafka.client_config())
    new_topics = [
        NewTopic(spec.name, spec.partitions, spec.replication_factor, config=spec.config)
        for spec in specs
    ]
    created = []
    for name, future in admin.create_topics(new_topics, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            error = exc.args[0]
            if (
                isinstance(error, _RdKafkaError)
                and error.code() == _RdKafkaError.TOPIC_ALREADY_EXISTS
            ):
                continue
            raise TopicAdminError(f"creating topic {name!r} failed: {error}") from exc
    _wait_for_leaders(admin, [spec.name for spec in specs], timeout_s)
    return created


def _wait_for_leaders(admin: AdminClient, names: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        metadata = admin.list_topics(timeout=timeout_s)
        leaderless = [
            name
            for name in names
            if name not in metadata.topics
            or metadata.topics[name].error is not None
            or not metadata.topics[name].partitions
            or any(p.leader < 0 for p in metadata.topics[name].partitions.values())
        ]
        if not leaderless:
            return
        if time.monotonic() > deadline:
            raise TopicAdminError(f"topics without a leader after {timeout_s:.0f}s: {leaderless}")
        time.sleep(0.05)


def model_topic_specs(topics: ModelTopics, partitions: int = 3) -> list[TopicSpec]:
    """The four topics of one model; the DLQ keeps its records for two weeks."""
    return [
        TopicSpec(topics.requests, partitions),
        TopicSpec(topics.batch, partitions),
        TopicSpec(topics.results, partitions),
        TopicSpec(topics.dlq, 1, config={"retention.ms": str(14 * 24 * 3600 * 1000)}),
    ]


def control_topic_spec(namespace: str) -> TopicSpec:
    """Compacted, one partition: every worker reads the whole routing state in order."""
    return TopicSpec(
        control_topic(namespace),
        1,
        config={"cleanup.policy": "compact", "min.compaction.lag.ms": "0"},
    )
