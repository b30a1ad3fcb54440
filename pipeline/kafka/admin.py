"""Creating topics idempotently, as durable as the cluster allows.

A topic the product creates gets the cluster's replication factor (at least ``min(3, brokers)``,
or ``kafka.replication_factor``) and, where it has 3 replicas or more, ``min.insync.replicas``
of a majority of them: with ``acks=all`` (every producer profile) an acknowledged record is then
on at least two brokers, and losing one broker stops no writer.
"""

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
    replication_factor: int | None = None
    """``None``: what :func:`plan_durability` decides for the cluster."""
    config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Durability:
    replication_factor: int
    min_insync_replicas: int | None
    """``None``: leave the broker's default (too few replicas for a majority to matter)."""


def plan_durability(
    brokers: int,
    cluster_default_rf: int | None,
    configured_rf: int | None = None,
    configured_min_insync: int | None = None,
) -> Durability:
    """Replication of new topics on a cluster of ``brokers`` (pure).

    The configured factor wins; otherwise three replicas where there are three brokers (fewer
    on a smaller cluster), or the cluster's ``default.replication.factor`` if an operator set it
    higher. ``min.insync.replicas`` is a majority of three or more replicas, so one broker may
    be down without stopping writes; with one or two replicas it stays the broker's default.
    """
    if brokers < 1:
        raise TopicAdminError("the cluster reports no brokers")
    if configured_rf is not None:
        factor = configured_rf
    else:
        factor = max(min(3, brokers), min(cluster_default_rf or 1, brokers))
    if factor > brokers:
        raise TopicAdminError(
            f"replication factor {factor} needs at least {factor} brokers;"
            f" the cluster has {brokers}"
        )
    return Durability(factor, min_insync_for(factor, configured_min_insync))


def min_insync_for(replication_factor: int, configured: int | None = None) -> int | None:
    """``min.insync.replicas`` for a topic of ``replication_factor`` replicas (pure)."""
    if configured is not None:
        if configured > replication_factor:
            raise TopicAdminError(
                f"min_insync_replicas {configured} exceeds the replication factor"
                f" {replication_factor}: every acks=all write would fail"
            )
        return configured
    if replication_factor < 3:
        return None
    return replication_factor // 2 + 1


def new_topic(spec: TopicSpec, durability: Durability, kafka: KafkaSettings) -> NewTopic:
    """The ``NewTopic`` for ``spec`` on a cluster planned as ``durability`` (pure).

    A spec's own replication factor or ``min.insync.replicas`` wins over the plan.
    """
    factor = spec.replication_factor or durability.replication_factor
    config = dict(spec.config)
    if "min.insync.replicas" not in config:
        if spec.replication_factor is None:
            min_insync = durability.min_insync_replicas
        else:
            min_insync = min_insync_for(factor, kafka.min_insync_replicas)
        if min_insync is not None:
            config["min.insync.replicas"] = str(min_insync)
    return NewTopic(spec.name, spec.partitions, factor, config=config)


def cluster_durability(
    admin: AdminClient, kafka: KafkaSettings, timeout_s: float = 15.0
) -> Durability:
    """:func:`plan_durability` for the cluster ``admin`` talks to (broker count and, where
    this principal may read it, the brokers' ``default.replication.factor``)."""
    brokers = admin.list_topics(timeout=timeout_s).brokers
    return plan_durability(
        len(brokers),
        _default_replication_factor(admin, sorted(brokers), timeout_s),
        kafka.replication_factor,
        kafka.min_insync_replicas,
    )


def _default_replication_factor(
    admin: AdminClient, broker_ids: list[int], timeout_s: float
) -> int | None:
    if not broker_ids:
        return None
    resource = ConfigResource(ConfigResource.Type.BROKER, str(broker_ids[0]))
    try:
        (future,) = admin.describe_configs([resource], request_timeout=timeout_s).values()
        value = future.result(timeout=timeout_s)["default.replication.factor"].value
        return int(value)
    except (KafkaException, KeyError, ValueError, TypeError):
        # A least-privilege principal may not describe the cluster's configuration: the
        # broker count alone then decides.
        return None


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
    durability = cluster_durability(admin, kafka, timeout_s)
    new_topics = [new_topic(spec, durability, kafka) for spec in specs]
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
