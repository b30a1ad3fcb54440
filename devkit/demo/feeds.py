"""A live, labelled invoice feed: what the accounts-payable system would send Sluiceway.

One thread publishes supplier invoices at a steady rate; another reads their results and, for
each, publishes the ground truth as ``Feedback`` (in reality the label arrives when the invoice
is paid or disputed, weeks later; here at once, so the quality monitor has labels to judge by).
Used by the rollback part of ``make demo`` and by the monitor's integration tests.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import schemas
from devkit.modeling.invoices import FEATURES, Shift, generate
from pipeline.kafka import clients
from pipeline.kafka.clients import ConsumerRole, ProducerRole
from pipeline.kafka.events import follow
from pipeline.settings import Settings
from pipeline.topics import ModelTopics
from schemas.models import Feedback, InferenceRequest, InferenceResult, Inputs, Source


@dataclass
class LabelledFeed:
    settings: Settings
    model: str
    rate: float
    """Invoices per second."""
    shift: Shift | None = None
    """Change it while the feed runs to change the traffic from the next second on."""
    published: int = 0
    labelled: int = 0
    served_by: list[tuple[float, str]] = field(default_factory=list)
    """(monotonic time read, version) of every result, in arrival order."""
    _labels: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def topics(self) -> ModelTopics:
        return ModelTopics(self.settings.namespace, self.model)

    def start(self) -> LabelledFeed:
        self._threads = [
            threading.Thread(target=self._publish, name="feed-publish", daemon=True),
            threading.Thread(target=self._label, name="feed-label", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def served_since(self, since: float, version: str) -> bool:
        return any(t > since and v == version for t, v in list(self.served_by))

    def _publish(self) -> None:
        producer = clients.producer(self.settings.kafka, role=ProducerRole.FEED)
        second = 0
        while not self._stop.is_set():
            second += 1
            invoices = generate(max(int(self.rate), 1), seed=1_000 + second, shift=self.shift)
            started = time.monotonic()
            for index, (row, label) in enumerate(zip(invoices.x, invoices.y, strict=True)):
                if self._stop.is_set():
                    break
                request = InferenceRequest(
                    request_id=uuid.uuid4(),
                    model=self.model,
                    inputs=Inputs(
                        features={n: round(float(v), 2) for n, v in zip(FEATURES, row, strict=True)}
                    ),
                    source=Source(
                        system="SAP S/4HANA",
                        entity_type="SupplierInvoice",
                        entity_id=f"52{second:05d}{index:04d}",
                    ),
                )
                self._labels[str(request.request_id)] = int(label)
                producer.produce(self.topics.requests, schemas.encode(request))
                producer.poll(0)
                self.published += 1
                pause = started + (index + 1) / self.rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)  # pacing the feed
        producer.flush(10)

    def _label(self) -> None:
        consumer = clients.consumer(
            self.settings.kafka,
            # Within the SDK's group prefix: on a secured broker the feed runs as its principal.
            group_id=clients.throwaway_group("sluiceway-subscriber-feedback"),
            role=ConsumerRole.SUBSCRIBER,
        )
        consumer.subscribe([self.topics.results])
        producer = clients.producer(self.settings.kafka, role=ProducerRole.FEED)
        try:
            for result in follow(consumer, InferenceResult, until=self._stop.is_set, batch=200):
                self.served_by.append((time.monotonic(), result.model_version or ""))
                label = self._labels.pop(str(result.request_id), None)
                if label is None:
                    continue
                feedback = Feedback(
                    request_id=result.request_id,
                    model=self.model,
                    model_version=result.model_version,
                    label=label,
                    observed_at=datetime.now(UTC),
                    source="accounts-payable",
                )
                producer.produce(self.topics.feedback, schemas.encode(feedback))
                producer.poll(0)
                self.labelled += 1
        finally:
            producer.flush(10)
            consumer.close()
