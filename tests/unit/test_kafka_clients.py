"""The Kafka client factory: each role's effective librdkafka configuration, without a broker."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from pipeline.kafka import clients
from pipeline.kafka.clients import ConsumerRole, ProducerRole
from pipeline.settings import KafkaSettings

PLAIN = KafkaSettings(bootstrap_servers="broker-1:9092,broker-2:9092", client_id="svc")
CONNECTION = {
    "bootstrap.servers": "broker-1:9092,broker-2:9092",
    "security.protocol": "PLAINTEXT",
    "client.id": "svc",
}
SECURITY = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.username": "sluiceway",
    "sasl.password": "hunter2",
}


@pytest.fixture
def secure(tmp_path: Path) -> KafkaSettings:
    """SASL_SSL with SCRAM; the CA file must exist, or the settings refuse to load."""
    ca = tmp_path / "ca.pem"
    ca.write_text("a CA certificate\n")
    return KafkaSettings(
        bootstrap_servers="broker-1:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="sluiceway",
        sasl_password=SecretStr("hunter2"),
        ssl_ca_location=ca,
        client_id="svc",
    )


# ---------------------------------------------------------------- producers


@pytest.mark.parametrize(
    ("role", "profile"),
    [
        (ProducerRole.RELIABLE, {"acks": "all", "enable.idempotence": True}),
        (ProducerRole.REQUESTS, {"acks": "all", "enable.idempotence": True, "linger.ms": 2}),
        (
            ProducerRole.LOW_LATENCY,
            {
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 2,
                "compression.type": "lz4",
            },
        ),
        (ProducerRole.FEED, {"acks": "all", "linger.ms": 5}),
    ],
)
def test_each_producer_role_has_its_profile_on_top_of_the_connection(
    role: ProducerRole, profile: dict[str, Any]
) -> None:
    assert clients.producer_config(PLAIN, role=role) == {**CONNECTION, **profile}
    assert clients.producer_profile(role) == profile


def test_the_transactional_role_is_the_batch_runners_bulk_writer() -> None:
    config = clients.producer_config(
        PLAIN,
        role=ProducerRole.TRANSACTIONAL,
        transactional_id="ns.batch-runner.job-1",
        transaction_timeout_ms=60_000,
    )
    assert config == {
        **CONNECTION,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 20,
        "compression.type": "lz4",
        "transactional.id": "ns.batch-runner.job-1",
        "transaction.timeout.ms": 60_000,
    }


def test_a_transactional_producer_without_an_id_is_refused() -> None:
    with pytest.raises(ValueError, match="transactional_id"):
        clients.producer_config(PLAIN, role=ProducerRole.TRANSACTIONAL)


def test_a_transaction_timeout_without_a_transactional_id_adds_nothing() -> None:
    config = clients.producer_config(PLAIN, role=ProducerRole.RELIABLE, transaction_timeout_ms=1)
    assert "transaction.timeout.ms" not in config
    assert "transactional.id" not in config


def test_the_workers_producer_is_reproduced_exactly() -> None:
    """What ``workers/inference/worker.py::_producer_config`` builds, exactly-once mode on."""
    max_message_bytes = 8 * 1024 * 1024
    worker_today = {
        **PLAIN.client_config(),
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 2,
        "compression.type": "lz4",
        "message.max.bytes": max_message_bytes + 65536,
        "transactional.id": "sluiceway-workers-w1",
        "transaction.timeout.ms": 15_000,
    }
    built = clients.producer_config(
        PLAIN,
        role=ProducerRole.LOW_LATENCY,
        transactional_id="sluiceway-workers-w1",
        overrides={"message.max.bytes": max_message_bytes + 65536},
    )
    assert built == worker_today
    without_transactions = {
        k: v for k, v in worker_today.items() if not k.startswith("transaction")
    }
    assert (
        clients.producer_config(
            PLAIN,
            role=ProducerRole.LOW_LATENCY,
            overrides={"message.max.bytes": max_message_bytes + 65536},
        )
        == without_transactions
    )


# ---------------------------------------------------------------- consumers


@pytest.mark.parametrize(
    ("role", "profile"),
    [
        (
            ConsumerRole.COMMITTED,
            {
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
            },
        ),
        (
            ConsumerRole.READER,
            {"enable.auto.commit": False, "isolation.level": "read_committed"},
        ),
        (
            ConsumerRole.SNAPSHOT,
            {
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
            },
        ),
        (
            ConsumerRole.SUBSCRIBER,
            {
                "enable.auto.commit": True,
                "auto.offset.reset": "latest",
                "isolation.level": "read_committed",
            },
        ),
    ],
)
def test_each_consumer_role_has_its_profile_on_top_of_the_connection(
    role: ConsumerRole, profile: dict[str, Any]
) -> None:
    config = clients.consumer_config(PLAIN, group_id="g", role=role)
    assert config == {**CONNECTION, **profile, "group.id": "g"}
    assert clients.consumer_profile(role) == profile


def test_the_workers_consumer_is_reproduced_exactly() -> None:
    """What ``workers/inference/worker.py::_consumer_config`` builds."""
    worker_today = {
        **PLAIN.client_config(),
        "group.id": "sluiceway-workers",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "partition.assignment.strategy": "cooperative-sticky",
        "max.poll.interval.ms": 300_000,
        "max.partition.fetch.bytes": 64 * 1024,
        "fetch.max.bytes": 1024 * 1024,
        "queued.max.messages.kbytes": 1024,
    }
    built = clients.consumer_config(PLAIN, group_id="sluiceway-workers", role=ConsumerRole.WORKER)
    assert built == worker_today


def test_without_a_group_id_a_consumer_gets_a_throwaway_group_of_its_role() -> None:
    first = clients.consumer_config(PLAIN, group_id=None, role=ConsumerRole.READER)
    second = clients.consumer_config(PLAIN, group_id=None, role=ConsumerRole.READER)
    assert re.fullmatch(r"sluiceway-reader-[0-9a-f]{8}", str(first["group.id"]))
    assert first["group.id"] != second["group.id"]
    assert re.fullmatch(r"tail-[0-9a-f]{8}", clients.throwaway_group("tail"))


# ---------------------------------------------------------------- every role


def _every_config(kafka: KafkaSettings, **kwargs: Any) -> list[dict[str, Any]]:
    configs: list[dict[str, Any]] = [clients.admin_config(kafka, **kwargs)]
    for producer_role in ProducerRole:
        configs.append(
            clients.producer_config(kafka, role=producer_role, transactional_id="t", **kwargs)
        )
    for consumer_role in ConsumerRole:
        configs.append(clients.consumer_config(kafka, group_id="g", role=consumer_role, **kwargs))
    return configs


def test_security_settings_reach_every_role_and_the_admin_client(secure: KafkaSettings) -> None:
    for config in _every_config(secure):
        assert {k: config.get(k) for k in SECURITY} == SECURITY
        assert config["ssl.ca.location"] == str(secure.ssl_ca_location)
        assert config["bootstrap.servers"] == "broker-1:9093"
        assert config["client.id"] == "svc"


def test_the_admin_client_gets_connection_and_security_only(secure: KafkaSettings) -> None:
    assert clients.admin_config(PLAIN) == CONNECTION
    assert clients.admin_config(secure) == secure.client_config()


def test_overrides_win_over_profile_group_and_settings(secure: KafkaSettings) -> None:
    overrides = {
        "linger.ms": 0,
        "enable.auto.commit": True,
        "group.id": "overridden",
        "client.id": "overridden",
        "security.protocol": "SSL",
        "socket.timeout.ms": 2000,
    }
    for config in _every_config(secure, overrides=overrides):
        for key, value in overrides.items():
            assert config[key] == value
        assert config["sasl.password"] == "hunter2"


def test_a_client_id_suffix_names_the_role_in_the_client_id() -> None:
    for config in _every_config(PLAIN, client_id_suffix="sdk"):
        assert config["client.id"] == "svc-sdk"


def test_profiles_are_not_changed_by_what_a_caller_does_with_its_config() -> None:
    config = clients.consumer_config(PLAIN, group_id="g", role=ConsumerRole.WORKER)
    config["enable.auto.commit"] = True
    clients.consumer_profile(ConsumerRole.WORKER)["fetch.max.bytes"] = 1
    fresh = clients.consumer_config(PLAIN, group_id="g", role=ConsumerRole.WORKER)
    assert fresh["enable.auto.commit"] is False
    assert fresh["fetch.max.bytes"] == 1024 * 1024


# ---------------------------------------------------------------- constructors


class _Recorded:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config


def test_the_constructors_build_clients_from_exactly_the_pure_configs(
    monkeypatch: pytest.MonkeyPatch, secure: KafkaSettings
) -> None:
    monkeypatch.setattr(clients, "Producer", _Recorded)
    monkeypatch.setattr(clients, "Consumer", _Recorded)
    monkeypatch.setattr(clients, "AdminClient", _Recorded)
    overrides = {"socket.timeout.ms": 2000}

    built_producer: Any = clients.producer(
        secure, role=ProducerRole.LOW_LATENCY, transactional_id="t", overrides=overrides
    )
    assert built_producer.config == clients.producer_config(
        secure, role=ProducerRole.LOW_LATENCY, transactional_id="t", overrides=overrides
    )
    built_consumer: Any = clients.consumer(
        secure, group_id="g", role=ConsumerRole.WORKER, overrides=overrides
    )
    assert built_consumer.config == clients.consumer_config(
        secure, group_id="g", role=ConsumerRole.WORKER, overrides=overrides
    )
    built_admin: Any = clients.admin(secure, overrides=overrides)
    assert built_admin.config == clients.admin_config(secure, overrides=overrides)
