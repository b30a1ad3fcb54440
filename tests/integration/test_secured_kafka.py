"""The secured stack's broker: who gets in (SCRAM, mTLS, OAUTHBEARER) and what each may touch.

Every check runs against the real broker of :mod:`tests.integration.secured_stack`; the
refusals are the broker's own answers (authentication failures, TOPIC_AUTHORIZATION_FAILED).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._acl import AclBinding, AclOperation, AclPermissionType
from confluent_kafka.admin._resource import ResourcePatternType, ResourceType
from cryptography.hazmat.primitives.asymmetric import rsa

from devkit.stack import manager
from devkit.stack.kafka_security import apply_stack_acls
from devkit.stack.oauth import AUDIENCE, ISSUER, ensure_issuer, key_id, mint_token
from devkit.stack.tls import ensure_authority
from pipeline.kafka import acl_admin, clients
from pipeline.kafka.admin import TopicSpec, control_topic_spec, ensure_topics, model_topic_specs
from pipeline.kafka.exceptions import TopicAdminError
from pipeline.topics import ModelTopics, control_topic
from tests.integration.secured_stack import SecuredStack
from tests.integration.waiting import wait_for

# The stack's default settings: connector "sap" serves invoice_risk, nobody's connector scaler.
OWN, OTHER = "scaler", "invoice_risk"
NS = "inference"


@pytest.fixture(scope="module")
def stack(secured_stack: SecuredStack) -> SecuredStack:
    """The secured stack with the topics of both models and the control topic in place."""
    specs = [control_topic_spec(NS)]
    for model in (OWN, OTHER):
        specs += model_topic_specs(ModelTopics(NS, model))
    ensure_topics(secured_stack.admin_kafka(), specs)
    return secured_stack


def _metadata_error(config: dict[str, Any]) -> list[KafkaError]:
    """Ask for metadata; return the client's errors (empty when it got metadata)."""
    errors: list[KafkaError] = []
    admin = AdminClient({**config, "socket.timeout.ms": 3000, "error_cb": errors.append})
    try:
        metadata = admin.list_topics(timeout=6)
    except KafkaException as exc:
        return [*errors, exc.args[0]]
    assert metadata.brokers, "metadata without brokers"
    return []


def _authentication_failure(config: dict[str, Any]) -> KafkaError:
    """The authentication error the client reports (through ``error_cb``, served on poll)."""
    errors: list[KafkaError] = []
    admin = AdminClient({**config, "socket.timeout.ms": 3000, "error_cb": errors.append})
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=3)

    def reported() -> bool:
        admin.poll(0.2)
        return any(error.code() == KafkaError._AUTHENTICATION for error in errors)

    wait_for(reported, 20, "an authentication error")
    return next(error for error in errors if error.code() == KafkaError._AUTHENTICATION)


def _produce(config: dict[str, Any], topic: str, value: bytes) -> KafkaError | None:
    """Produce one record; return the broker's answer (None: written)."""
    producer = Producer({**config, "message.timeout.ms": 10_000})
    outcome: list[KafkaError | None] = []
    # Keyed: the control topic is compacted and takes no record without a key.
    producer.produce(
        topic, value, key=b"probe", on_delivery=lambda error, _message: outcome.append(error)
    )
    wait_for(lambda: producer.poll(0.5) >= 0 and bool(outcome), 20, f"delivery to {topic}")
    return outcome[0]


def _read(config: dict[str, Any], topic: str, group: str, wanted: bytes) -> bool:
    """Whether ``wanted`` is read from ``topic`` (partitions assigned from their start)."""
    consumer = Consumer({**config, "group.id": group, "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        seen: list[bytes] = []

        def found() -> bool:
            seen.extend(m.value() or b"" for m in consumer.consume(50, 0.5) if not m.error())
            return wanted in seen

        wait_for(found, 20, f"{wanted!r} on {topic}")
        return True
    finally:
        consumer.close()


def _read_refusal(config: dict[str, Any], topic: str, group: str) -> KafkaError:
    """Subscribe to ``topic`` and return the error the broker answers with."""
    consumer = Consumer({**config, "group.id": group, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    errors: list[KafkaError] = []
    try:
        wait_for(
            lambda: bool(
                errors.extend(m.error() for m in consumer.consume(10, 0.5) if m.error()) or errors
            ),
            20,
            f"an error reading {topic}",
        )
    finally:
        consumer.close()
    return errors[0]


def _code(error: KafkaError | None) -> int | None:
    return None if error is None else int(error.code())


def _unique() -> bytes:
    return f"probe-{uuid.uuid4().hex}".encode()


# ---------------------------------------------------------------------------- authentication


def test_a_plaintext_client_gets_no_metadata_on_any_listener(stack: SecuredStack) -> None:
    ports = stack.settings.stack
    for port in (ports.kafka_port, ports.kafka_mtls_port, ports.kafka_oauth_port):
        errors = _metadata_error({"bootstrap.servers": f"127.0.0.1:{port}"})
        assert errors, f"a plaintext client got metadata on port {port}"


def test_tls_without_credentials_and_a_wrong_password_are_refused(stack: SecuredStack) -> None:
    scram = stack.librdkafka_config("client", "scram")
    no_login = {k: v for k, v in scram.items() if not k.startswith("sasl.")}
    no_login["security.protocol"] = "SSL"
    assert _metadata_error(no_login)

    wrong = {**scram, "sasl.password": scram["sasl.password"] + "x"}
    assert "Authentication failed" in _authentication_failure(wrong).str()
    unknown_user = {**scram, "sasl.username": "intruder"}
    assert "Authentication failed" in _authentication_failure(unknown_user).str()

    assert _metadata_error(scram) == []


def test_mtls_without_a_certificate_or_with_a_foreign_ca_is_refused(
    stack: SecuredStack, tmp_path: Path
) -> None:
    mtls = stack.librdkafka_config(f"worker-{OWN}", "mtls")
    no_cert = {k: v for k, v in mtls.items() if not k.startswith("ssl.certificate")}
    no_cert.pop("ssl.key.location")
    assert _metadata_error(no_cert)

    # Same subject, CN=worker-scaler, issued by a CA the broker does not trust.
    foreign = ensure_authority(tmp_path / "foreign").issue_client(tmp_path, f"worker-{OWN}")
    forged = {
        **mtls,
        "ssl.certificate.location": str(foreign.certificate),
        "ssl.key.location": str(foreign.key),
    }
    assert _metadata_error(forged)


def test_mtls_certificate_authenticates_as_its_principal(stack: SecuredStack) -> None:
    mtls = stack.librdkafka_config(f"worker-{OWN}", "mtls")
    assert _produce(mtls, ModelTopics(NS, OWN).results, _unique()) is None
    refused = _produce(mtls, ModelTopics(NS, OTHER).results, _unique())
    assert _code(refused) == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_oauth_token_of_the_stack_issuer_authenticates_as_its_subject(
    stack: SecuredStack,
) -> None:
    oauth = stack.librdkafka_config(f"worker-{OWN}", "oauth")
    assert _produce(oauth, ModelTopics(NS, OWN).results, _unique()) is None
    refused = _produce(oauth, ModelTopics(NS, OTHER).results, _unique())
    assert _code(refused) == KafkaError.TOPIC_AUTHORIZATION_FAILED


@pytest.mark.parametrize("forgery", ["foreign key, same kid", "wrong audience", "wrong issuer"])
def test_oauth_token_not_from_the_stack_issuer_is_refused(
    stack: SecuredStack, forgery: str
) -> None:
    real = ensure_issuer(stack.state_dir).private_key()
    claims: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE}
    key = real
    if forgery == "foreign key, same kid":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif forgery == "wrong audience":
        claims["audience"] = "someone-else"
    else:
        claims["issuer"] = "https://evil.example"
    token = mint_token(key, "admin", kid=key_id(real.public_key()), **claims)
    config = {
        **stack.librdkafka_config("admin", "oauth"),
        "oauth_cb": lambda _config: (token, time.time() + 3600),
    }
    errors = _metadata_error(config)
    assert errors, f"a token with {forgery} got metadata as admin"


# ---------------------------------------------------------------------------- authorisation


def test_worker_reads_its_requests_and_writes_its_results_only(stack: SecuredStack) -> None:
    worker = stack.librdkafka_config(f"worker-{OWN}", "scram")
    client = stack.librdkafka_config("client", "scram")
    own, other = ModelTopics(NS, OWN), ModelTopics(NS, OTHER)
    request = _unique()
    assert _produce(client, own.requests, request) is None
    assert _read(worker, own.requests, f"{NS}.worker.{OWN}", request)
    assert _produce(worker, own.results, _unique()) is None
    reply_topic = f"{NS}.replies.test-{uuid.uuid4().hex[:8]}"
    ensure_topics(stack.admin_kafka(), [TopicSpec(reply_topic, 1)])
    assert _produce(worker, reply_topic, _unique()) is None

    for topic in (other.requests, control_topic(NS), other.results):
        refused = _produce(worker, topic, _unique())
        assert refused is not None, f"worker-{OWN} wrote {topic}"
        assert refused.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, (topic, refused)
    refusal = _read_refusal(worker, other.requests, f"{NS}.worker.{OWN}")
    assert refusal.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    # Its own group, not another model's: a group is as much a resource as a topic.
    refusal = _read_refusal(worker, own.requests, f"{NS}.worker.{OTHER}")
    assert refusal.code() == KafkaError.GROUP_AUTHORIZATION_FAILED


def test_connector_reads_results_only_of_the_models_it_serves(stack: SecuredStack) -> None:
    connector = stack.librdkafka_config("connector-sap", "scram")  # serves invoice_risk
    producer_of_other = stack.librdkafka_config(f"worker-{OTHER}", "scram")
    served, unserved = ModelTopics(NS, OTHER), ModelTopics(NS, OWN)
    result = _unique()
    assert _produce(producer_of_other, served.results, result) is None
    assert _read(connector, served.results, f"{NS}.connector.sap.writeback", result)
    assert _produce(connector, served.requests, _unique()) is None

    refusal = _read_refusal(connector, unserved.results, f"{NS}.connector.sap.writeback")
    assert refusal.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    refused = _produce(connector, unserved.requests, _unique())
    assert _code(refused) == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_monitor_writes_control_and_a_worker_reads_it(stack: SecuredStack) -> None:
    monitor = stack.librdkafka_config("monitor", "scram")
    event = _unique()
    assert _produce(monitor, control_topic(NS), event) is None
    worker = stack.librdkafka_config(f"worker-{OWN}", "scram")
    assert _read(worker, control_topic(NS), f"sluiceway-control-{uuid.uuid4().hex[:8]}", event)
    refused = _produce(monitor, ModelTopics(NS, OWN).requests, _unique())
    assert _code(refused) == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_acl_apply_is_idempotent_and_reports_stale_bindings_it_owns(stack: SecuredStack) -> None:
    again = apply_stack_acls(stack.settings)
    assert (again.created, again.users_created, again.stale) == ([], [], [])
    assert again.unchanged > 0

    ghost = AclBinding(
        ResourceType.TOPIC,
        f"{NS}.ghost.requests",
        ResourcePatternType.LITERAL,
        "User:worker-ghost",
        "*",
        AclOperation.READ,
        AclPermissionType.ALLOW,
    )
    foreign = AclBinding(
        ResourceType.TOPIC,
        f"{NS}.ghost.requests",
        ResourcePatternType.LITERAL,
        "User:someone-else",
        "*",
        AclOperation.READ,
        AclPermissionType.ALLOW,
    )
    admin = clients.admin(stack.admin_kafka())
    for future in admin.create_acls([ghost, foreign]).values():
        future.result(timeout=15)

    reported = apply_stack_acls(stack.settings)
    assert [acl_admin.key_of(b) for b in reported.stale] == [acl_admin.key_of(ghost)]
    pruned = apply_stack_acls(stack.settings, prune=True)
    assert [acl_admin.key_of(b) for b in pruned.removed] == [acl_admin.key_of(ghost)]
    after = apply_stack_acls(stack.settings)
    assert after.stale == []
    # Someone else's binding is not ours to remove.
    remaining = admin.describe_acls(acl_admin.filter_of(foreign)).result(timeout=15)
    assert [acl_admin.key_of(b) for b in remaining] == [acl_admin.key_of(foreign)]


def test_admin_healthy_probe_and_principal_settings_work(stack: SecuredStack) -> None:
    """Product code configured by ``stack credentials`` lines reaches the broker."""
    settings = stack.principal_settings(f"worker-{OWN}")
    producer = clients.producer(settings.kafka, role=clients.ProducerRole.RELIABLE)
    outcome: list[KafkaError | None] = []
    producer.produce(
        ModelTopics(NS, OWN).results, _unique(), on_delivery=lambda e, _m: outcome.append(e)
    )
    assert producer.flush(15) == 0
    assert outcome == [None]


def test_a_worker_creates_its_own_topics_in_a_fresh_namespace_but_no_one_elses(
    stack: SecuredStack,
) -> None:
    """What a worker ensures at start-up works under its ACLs (namespace of this test's own)."""
    namespace = f"sec-{uuid.uuid4().hex[:8]}"
    settings = stack.principal_settings(f"worker-{OWN}", base=stack.for_namespace(namespace))
    own = ModelTopics(namespace, OWN)
    specs = [control_topic_spec(namespace), *model_topic_specs(own)]
    assert sorted(ensure_topics(settings.kafka, specs)) == sorted(spec.name for spec in specs)
    assert _produce(stack.librdkafka_config(f"worker-{OWN}", "scram"), own.results, b"r") is None
    with pytest.raises(TopicAdminError, match="TOPIC_AUTHORIZATION_FAILED"):
        ensure_topics(settings.kafka, model_topic_specs(ModelTopics(namespace, OTHER)))


def test_stack_status_reports_kafka_healthy_through_the_admin_login(stack: SecuredStack) -> None:
    rows = {row.name: row for row in manager.status(stack.settings)}
    assert rows["kafka"].state == "healthy"
