"""Topic administration: end offsets of a fresh topic are waited out while its leader settles,
and new topics are as durable as the cluster allows."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from pipeline.kafka import clients
from pipeline.kafka.admin import (
    Durability,
    TopicSpec,
    cluster_durability,
    control_topic_spec,
    end_offsets_with,
    ensure_topics,
    model_topic_specs,
    new_topic,
    plan_durability,
)
from pipeline.kafka.exceptions import TopicAdminError
from pipeline.settings import KafkaSettings
from pipeline.topics import ModelTopics


@dataclass
class _Offset:
    offset: int


@dataclass
class _Topic:
    partitions: dict[int, object]


@dataclass
class _Metadata:
    topics: dict[str, _Topic]


@dataclass
class _SettlingAdmin:
    """Answers list_offsets with the given errors first, then with offset 7 per partition."""

    errors: list[int]
    calls: int = field(default=0)

    def list_topics(self, topic: str, timeout: float) -> _Metadata:
        return _Metadata({topic: _Topic({0: object(), 1: object()})})

    def list_offsets(self, requests: dict[Any, Any], request_timeout: float) -> dict[Any, Any]:
        self.calls += 1
        if self.errors:
            raise KafkaException(KafkaError(self.errors.pop(0)))
        answers = {}
        for partition in requests:
            future: Future[_Offset] = Future()
            future.set_result(_Offset(7))
            answers[partition] = future
        return answers


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
    ],
)
def test_a_settling_leader_is_waited_out(code: int) -> None:
    admin = _SettlingAdmin(errors=[code, code])
    assert end_offsets_with(admin, "t", timeout_s=5.0) == {0: 7, 1: 7}  # type: ignore[arg-type]
    assert admin.calls == 3


def test_a_lasting_refusal_is_a_typed_error() -> None:
    admin = _SettlingAdmin(errors=[KafkaError.TOPIC_AUTHORIZATION_FAILED])
    with pytest.raises(TopicAdminError, match="end offsets of 't'"):
        end_offsets_with(admin, "t", timeout_s=5.0)  # type: ignore[arg-type]
    assert admin.calls == 1


# ---------------------------------------------------------------- durability of new topics


@pytest.mark.parametrize(
    ("brokers", "cluster_default", "expected"),
    [
        (1, None, Durability(1, None)),
        (1, 1, Durability(1, None)),
        (2, None, Durability(2, None)),
        (3, None, Durability(3, 2)),
        (6, None, Durability(3, 2)),
        (6, 1, Durability(3, 2)),
        # an operator who raised the cluster's default is not overruled
        (6, 5, Durability(5, 3)),
        # a default above the broker count cannot be met
        (2, 3, Durability(2, None)),
    ],
)
def test_new_topics_get_the_clusters_replication(
    brokers: int, cluster_default: int | None, expected: Durability
) -> None:
    assert plan_durability(brokers, cluster_default) == expected


def test_configured_replication_wins_and_is_checked_against_the_cluster() -> None:
    assert plan_durability(5, 3, configured_rf=2) == Durability(2, None)
    assert plan_durability(5, None, configured_rf=5, configured_min_insync=4) == Durability(5, 4)
    with pytest.raises(TopicAdminError, match="needs at least 3 brokers; the cluster has 1"):
        plan_durability(1, None, configured_rf=3)
    with pytest.raises(TopicAdminError, match="exceeds the replication factor 3"):
        plan_durability(3, None, configured_min_insync=4)
    with pytest.raises(TopicAdminError, match="no brokers"):
        plan_durability(0, None)


def test_a_spec_keeps_its_own_replication_and_min_insync() -> None:
    kafka = KafkaSettings()
    durability = Durability(3, 2)
    planned = new_topic(TopicSpec("t", 6, config={"retention.ms": "1"}), durability, kafka)
    assert (planned.num_partitions, planned.replication_factor) == (6, 3)
    assert planned.config == {"retention.ms": "1", "min.insync.replicas": "2"}
    own = new_topic(TopicSpec("t", 1, replication_factor=1), durability, kafka)
    assert (own.replication_factor, own.config) == (1, {})
    pinned = new_topic(TopicSpec("t", config={"min.insync.replicas": "1"}), durability, kafka)
    assert pinned.config == {"min.insync.replicas": "1"}


@dataclass
class _Entry:
    value: str


@dataclass
class _Cluster:
    """An admin that knows its brokers and (unless refused) their default replication."""

    brokers: int
    default_rf: str | None = "1"
    refused: bool = False
    created: list[Any] = field(default_factory=list)

    def list_topics(self, topic: str | None = None, timeout: float = 0) -> Any:
        topics = {
            t.topic: _CreatedTopic({p: _Partition(leader=1) for p in range(t.num_partitions)})
            for t in self.created
        }
        return _ClusterMetadata({i: object() for i in range(1, self.brokers + 1)}, topics)

    def describe_configs(self, resources: list[Any], request_timeout: float) -> dict[Any, Any]:
        future: Future[dict[str, _Entry]] = Future()
        if self.refused:
            future.set_exception(
                KafkaException(KafkaError(KafkaError.CLUSTER_AUTHORIZATION_FAILED))
            )
        elif self.default_rf is None:
            future.set_result({})
        else:
            future.set_result({"default.replication.factor": _Entry(self.default_rf)})
        return {resources[0]: future}

    def create_topics(self, topics: list[Any], request_timeout: float) -> dict[str, Any]:
        self.created.extend(topics)
        answers = {}
        for topic in topics:
            future: Future[None] = Future()
            future.set_result(None)
            answers[topic.topic] = future
        return answers

    def list_offsets(self, requests: dict[Any, Any], request_timeout: float) -> dict[Any, Any]:
        answers = {}
        for partition in requests:
            future: Future[_Offset] = Future()
            future.set_result(_Offset(0))
            answers[partition] = future
        return answers


@dataclass
class _Partition:
    leader: int


@dataclass
class _CreatedTopic:
    partitions: dict[int, _Partition]
    error: object = None


@dataclass
class _ClusterMetadata:
    brokers: dict[int, object]
    topics: dict[str, Any]


@pytest.mark.parametrize(
    ("cluster", "expected"),
    [
        (_Cluster(brokers=1), Durability(1, None)),
        (_Cluster(brokers=3), Durability(3, 2)),
        (_Cluster(brokers=5, default_rf="5"), Durability(5, 3)),
        # a least-privilege principal may not read broker configs: the count decides
        (_Cluster(brokers=5, refused=True), Durability(3, 2)),
        (_Cluster(brokers=3, default_rf=None), Durability(3, 2)),
        (_Cluster(brokers=3, default_rf="three"), Durability(3, 2)),
    ],
)
def test_the_cluster_is_asked_for_its_brokers_and_default(
    cluster: _Cluster, expected: Durability
) -> None:
    assert cluster_durability(cluster, KafkaSettings(), 5.0) == expected  # type: ignore[arg-type]


def test_ensure_topics_creates_every_topic_as_durable_as_the_cluster_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = _Cluster(brokers=3)
    monkeypatch.setattr(clients, "admin", lambda _kafka: cluster)
    specs = [*model_topic_specs(ModelTopics("ns", "m")), control_topic_spec("ns")]
    created = ensure_topics(KafkaSettings(), specs, timeout_s=5.0)
    assert created == [spec.name for spec in specs]
    assert {t.topic: t.replication_factor for t in cluster.created} == {s.name: 3 for s in specs}
    assert all(t.config["min.insync.replicas"] == "2" for t in cluster.created)
    control = next(t for t in cluster.created if t.topic == "ns.control")
    assert control.config["cleanup.policy"] == "compact"


def test_configured_durability_reaches_ensure_topics(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = _Cluster(brokers=5)
    monkeypatch.setattr(clients, "admin", lambda _kafka: cluster)
    kafka = KafkaSettings(replication_factor=5, min_insync_replicas=4)
    ensure_topics(kafka, [TopicSpec("a")], timeout_s=5.0)
    ensure_topics(KafkaSettings(), [TopicSpec("b", replication_factor=2)], timeout_s=5.0)
    assert [(t.replication_factor, t.config) for t in cluster.created] == [
        (5, {"min.insync.replicas": "4"}),
        (2, {}),
    ]
    with pytest.raises(TopicAdminError, match="exceeds the replication factor 2"):
        ensure_topics(
            KafkaSettings(min_insync_replicas=3),
            [TopicSpec("c", replication_factor=2)],
            timeout_s=5.0,
        )
