"""Creating topics idempotently."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka import KafkaError as _RdKafkaError
from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.admin._listoffsets import OffsetSpec
from confluent_kafka.cimpl import NewTopic

from pipeline.kafka import clients
from pipeline.kafka.exceptions import TopicAdminError
from pipeline.settings import KafkaSettings
from pipeline.topics import ModelTopics, batch_progress_topic, control_topic, drift_topic

# What a partition answers while its new leader is still taking over. The epoch errors show
# when the client's metadata and the broker's view of a fresh partition disagree for a moment
# (seen in CI: UNKNOWN_LEADER_EPOCH on list_offsets right after the leader appeared).
_LEADER_SETTLING = frozenset(
    {
        _RdKafkaError.NOT_LEADER_FOR_PARTITION,
        _RdKafkaError.LEADER_NOT_AVAILABLE,
        _RdKafkaError.UNKNOWN_TOPIC_OR_PART,
        _RdKafkaError.UNKNOWN_LEADER_EPOCH,
        _RdKafkaError.FENCED_LEADER_EPOCH,
    }
)


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

    Returns only once every partition of every named topic has a leader that answers offset
    requests, so the caller can produce, fetch offsets or consume at once: a fresh topic's
    leader shows in the metadata a moment before the broker serves it (NOT_LEADER meanwhile).
    """
    specs = list(topics)
    if not specs:
        return []
    admin = clients.admin(kafka)
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
    deadline = time.monotonic() + timeout_s
    _wait_for_leaders(admin, [spec.name for spec in specs], timeout_s)
    for spec in specs:
        _list_end_offsets(admin, spec.name, max(deadline - time.monotonic(), 1.0))
    return created


def end_offsets(kafka: KafkaSettings, topic: str, timeout_s: float = 15.0) -> dict[int, int]:
    """The next offset to be written in each partition of ``topic``.

    Retries while the broker answers with a retriable error (a leader still moving in).
    """
    return _list_end_offsets(clients.admin(kafka), topic, timeout_s)


def end_offsets_with(admin: AdminClient, topic: str, timeout_s: float) -> dict[int, int]:
    """:func:`end_offsets` through an admin client the caller keeps (one request per topic)."""
    return _list_end_offsets(admin, topic, timeout_s)


def _list_end_offsets(admin: AdminClient, topic: str, timeout_s: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        metadata = admin.list_topics(topic, timeout=timeout_s)
        partitions = sorted(metadata.topics[topic].partitions)
        try:
            futures = admin.list_offsets(
                {TopicPartition(topic, p): OffsetSpec.latest() for p in partitions},  # type: ignore[no-untyped-call]
                request_timeout=timeout_s,
            )
            return {tp.partition: future.result().offset for tp, future in futures.items()}
        except KafkaException as exc:
            error = exc.args[0]
            settling = isinstance(error, _RdKafkaError) and (
                error.retriable() or error.code() in _LEADER_SETTLING
            )
            if not settling or time.monotonic() > deadline:
                raise TopicAdminError(f"end offsets of {topic!r}: {error}") from exc
        time.sleep(0.05)


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


def monitor_topic_specs(namespace: str, topics: ModelTopics) -> list[TopicSpec]:
    """The feedback topic of a model and the namespace's drift-report topic."""
    return [TopicSpec(topics.feedback, 3), TopicSpec(drift_topic(namespace), 1)]


def control_topic_spec(namespace: str) -> TopicSpec:
    """Compacted, one partition: every worker reads the whole routing state in order."""
    return TopicSpec(
        control_topic(namespace),
        1,
        config={"cleanup.policy": "compact", "min.compaction.lag.ms": "0"},
    )


def invalidation_topic_spec(topics: ModelTopics) -> TopicSpec:
    """Compacted, keyed by entity like the requests: the latest word on each entity stays,
    so a reader starting late still learns of every withdrawn entity; three partitions
    spread the entities as the requests topic does."""
    return TopicSpec(
        topics.invalidations,
        3,
        config={"cleanup.policy": "compact", "min.compaction.lag.ms": "0"},
    )


def batch_progress_topic_spec(namespace: str) -> TopicSpec:
    """Compacted, one partition: a runner reads its job's last checkpoint from one log."""
    return TopicSpec(
        batch_progress_topic(namespace),
        1,
        config={"cleanup.policy": "compact", "min.compaction.lag.ms": "0"},
    )


@dataclass(frozen=True)
class TopicDescription:
    name: str
    partitions: int
    replication_factor: int
    cleanup_policy: str
    retention_ms: str


def describe_topics(
    kafka: KafkaSettings, prefix: str, timeout_s: float = 15.0
) -> list[TopicDescription]:
    """Every topic whose name starts with ``prefix``: layout and the settings that matter."""
    admin = clients.admin(kafka)
    metadata = admin.list_topics(timeout=timeout_s)
    names = sorted(name for name in metadata.topics if name.startswith(prefix))
    if not names:
        return []
    resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in names]
    configs = {
        resource.name: future.result(timeout=timeout_s)
        for resource, future in admin.describe_configs(resources).items()
    }
    described = []
    for name in names:
        partitions = metadata.topics[name].partitions
        replicas = len(next(iter(partitions.values())).replicas) if partitions else 0
        config = configs[name]
        described.append(
            TopicDescription(
                name,
                len(partitions),
                replicas,
                str(config["cleanup.policy"].value),
                str(config["retention.ms"].value),
            )
        )
    return described
