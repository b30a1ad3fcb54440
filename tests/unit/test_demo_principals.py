"""Which worker processes the demo starts, and as whom."""

from __future__ import annotations

from devkit.demo.run import MODEL, TEXT_MODEL, worker_assignments
from pipeline.settings import KafkaSettings, Settings
from workers.processes import Principals, as_principal


def _principals() -> Principals:
    def kafka(name: str) -> KafkaSettings:
        return KafkaSettings(client_id=name)

    return Principals(
        operator=kafka("admin"),
        client=kafka("client"),
        monitor=kafka("monitor"),
        workers={MODEL: kafka(f"worker-{MODEL}"), TEXT_MODEL: kafka(f"worker-{TEXT_MODEL}")},
    )


def test_without_principals_one_worker_serves_every_model_with_the_runs_settings() -> None:
    settings = Settings(namespace="demo")
    assert worker_assignments(settings, [MODEL, TEXT_MODEL], None) == [
        (settings, [MODEL, TEXT_MODEL])
    ]


def test_with_principals_each_model_gets_its_own_worker_as_its_own_principal() -> None:
    settings = Settings(namespace="demo")
    assigned = worker_assignments(settings, [MODEL, TEXT_MODEL], _principals())
    assert [(s.kafka.client_id, models) for s, models in assigned] == [
        (f"worker-{MODEL}", [MODEL]),
        (f"worker-{TEXT_MODEL}", [TEXT_MODEL]),
    ]
    # Only the Kafka identity changes: the rest is the run's settings.
    assert all(s.model_copy(update={"kafka": settings.kafka}) == settings for s, _ in assigned)


def test_as_principal_changes_only_kafka() -> None:
    settings = Settings(namespace="demo")
    other = as_principal(settings, KafkaSettings(client_id="monitor"))
    assert other.kafka.client_id == "monitor"
    assert other.namespace == "demo"
    assert other.object_store == settings.object_store
