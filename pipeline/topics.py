"""Topic names: one set of topics per model, under a configurable namespace.

Per-model topics give each model its own ACLs, retention and consumer group, so one model's
backlog never delays another's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelTopics:
    namespace: str
    model: str

    @property
    def requests(self) -> str:
        return f"{self.namespace}.{self.model}.requests"

    @property
    def batch(self) -> str:
        return f"{self.namespace}.{self.model}.batch"

    @property
    def results(self) -> str:
        return f"{self.namespace}.{self.model}.results"

    @property
    def dlq(self) -> str:
        return f"{self.namespace}.{self.model}.dlq"

    @property
    def dlq_handled(self) -> str:
        """Compacted, key = ``<partition>:<offset>`` of a letter: the letters of the DLQ that
        were replayed or purged (``pipeline/deadletters/markers.py``)."""
        return f"{self.namespace}.{self.model}.dlq.handled"

    @property
    def feedback(self) -> str:
        """Ground-truth labels for earlier requests (``Feedback`` events)."""
        return f"{self.namespace}.{self.model}.feedback"

    @property
    def invalidations(self) -> str:
        """Compacted, key = entity key: source records deleted or cancelled since their
        request (``Invalidation`` events, written by connectors)."""
        return f"{self.namespace}.{self.model}.invalidations"


def control_topic(namespace: str) -> str:
    return f"{namespace}.control"


def drift_topic(namespace: str) -> str:
    return f"{namespace}.drift"


def batch_progress_topic(namespace: str) -> str:
    """Compacted: per batch job, how far its input is published (written in the same
    transaction as the records it counts)."""
    return f"{namespace}.batch.progress"
