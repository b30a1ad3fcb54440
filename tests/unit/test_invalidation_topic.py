"""The invalidations topic of a model: its name and how it is created."""

from __future__ import annotations

from pipeline.kafka.admin import control_topic_spec, invalidation_topic_spec
from pipeline.topics import ModelTopics


def test_the_invalidations_topic_sits_beside_the_models_other_topics() -> None:
    topics = ModelTopics("inference", "invoice_risk")
    assert topics.invalidations == "inference.invoice_risk.invalidations"
    assert topics.invalidations.rsplit(".", 1)[0] == topics.requests.rsplit(".", 1)[0]


def test_the_invalidations_topic_is_compacted_with_three_partitions() -> None:
    spec = invalidation_topic_spec(ModelTopics("inference", "invoice_risk"))
    assert spec.name == "inference.invoice_risk.invalidations"
    assert spec.partitions == 3
    assert spec.config == {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}
    assert spec.config == control_topic_spec("inference").config
