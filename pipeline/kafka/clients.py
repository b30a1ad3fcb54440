"""The one place that builds confluent-kafka producers, consumers and admin clients.

A call site names a *role*; the role's profile is how that kind of client trades latency,
durability and visibility. A configuration is assembled in this order, later keys winning:

1. ``KafkaSettings.client_config()``: brokers, security (SASL/SSL) and client id, always,
   with the token callback of an ``oauth_token_file``;
2. the role's profile (:func:`producer_profile`, :func:`consumer_profile`);
3. what belongs to one client: ``client_id_suffix``, ``group_id``, ``transactional_id``;
4. ``overrides``, the caller's explicit exceptions to the profile.

:func:`producer_config`, :func:`consumer_config` and :func:`admin_config` are pure, so the
effective configuration is tested without a broker; :func:`producer`, :func:`consumer` and
:func:`admin` construct the clients from exactly those dictionaries.

Some profile values equal librdkafka's defaults (``acks=all``, ``linger.ms=5``,
``isolation.level=read_committed``, ``max.poll.interval.ms=300000``). They are written out
anyway: the guarantee a role relies on is then visible here, and does not move with a
library upgrade.

aiokafka and faust (the monitor) take their security from :func:`aiokafka_security` and
:func:`faust_credentials`, translated from the same settings, so no client of the product has
its own idea of how to reach the brokers.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from pipeline.kafka.oauth import FileTokenProvider, OidcTokenProvider, file_token_callback
from pipeline.settings import KafkaSettings

OAuthCallback = Callable[[str], tuple[str, float, str]]
ConfigValue = str | int | float | bool | OAuthCallback
Config = dict[str, ConfigValue]

DEFAULT_TRANSACTION_TIMEOUT_MS = 15_000
"""How long the broker lets a transaction stay open before it aborts it."""


class ProducerRole(StrEnum):
    RELIABLE = "reliable"
    """A few events that must not be lost or doubled (control, dead letters, checkpoints)."""
    REQUESTS = "requests"
    """Inference requests published while a caller waits for the ack (SDK, connectors)."""
    LOW_LATENCY = "low-latency"
    """A stream of results on the worker's hot path (the worker, its pass-through benchmark)."""
    TRANSACTIONAL = "transactional"
    """A bulk writer whose records become visible per transaction (the batch runner)."""
    FEED = "feed"
    """A paced load generator in the demo, tests and benchmarks."""


class ConsumerRole(StrEnum):
    WORKER = "worker"
    """The inference worker's group consumer (exactly what the worker has always built)."""
    COMMITTED = "committed"
    """Reads committed records from the oldest retained offset; commits only by hand."""
    READER = "reader"
    """Reads partitions it ``assign()``\\ s at offsets it chooses; commits nothing."""
    SNAPSHOT = "snapshot"
    """A :attr:`READER` that is told when it reached a partition's end (read a log to its end)."""
    SUBSCRIBER = "subscriber"
    """Follows topics from their end through a group that auto-commits (a viewer, a feed)."""


# acks=all: an acknowledged record is on every in-sync replica, so it survives losing a broker.
# enable.idempotence: librdkafka retries on its own; idempotence keeps a retry from writing a
# record twice or out of order within its partition.
_RELIABLE: Config = {"acks": "all", "enable.idempotence": True}

_PRODUCER_PROFILES: dict[ProducerRole, Config] = {
    ProducerRole.RELIABLE: _RELIABLE,
    ProducerRole.REQUESTS: {
        **_RELIABLE,
        # Someone waits for each ack (an SDK caller, a connector before it confirms to its
        # source): 2 ms still gathers a burst into one produce request, where the 5 ms default
        # would add to every round trip.
        "linger.ms": 2,
    },
    ProducerRole.LOW_LATENCY: {
        **_RELIABLE,
        # A request's end-to-end latency includes this wait; 2 ms still batches a busy stream.
        "linger.ms": 2,
        # Results (tensors, attributions) are larger and repetitive; lz4 is the cheapest codec
        # in CPU on the hot path and shrinks what the broker stores and replicates.
        "compression.type": "lz4",
    },
    ProducerRole.TRANSACTIONAL: {
        # acks=all is also what idempotence (required by transactions) imposes.
        **_RELIABLE,
        # Records become visible only when their transaction commits, so a longer wait for
        # fuller batches costs no latency anyone sees, and cuts produce requests.
        "linger.ms": 20,
        # Bulk records compress well; fewer bytes per transaction keep commits quick.
        "compression.type": "lz4",
    },
    ProducerRole.FEED: {
        # A test or benchmark counts only records the broker really holds. Not idempotent: the
        # feeds never were, and a duplicate from a retry is a case the pipeline handles anyway.
        "acks": "all",
        # Paced records gather for up to 5 ms (librdkafka's default, stated): the load
        # generator's produce requests should not be what a benchmark measures.
        "linger.ms": 5,
    },
}

# read_committed: batch jobs, the worker's exactly-once mode and checkpoints write in
# transactions; a record of an aborted or still open transaction must never be acted on.
_READ_COMMITTED: Config = {"isolation.level": "read_committed"}

_CONSUMER_PROFILES: dict[ConsumerRole, Config] = {
    ConsumerRole.WORKER: {
        # Offsets are committed only once the outcomes of every record before them were
        # acknowledged by the broker: at-least-once, never a silently dropped request.
        "enable.auto.commit": False,
        # A new group starts at the oldest retained request: none published before the worker
        # first joined is skipped.
        "auto.offset.reset": "earliest",
        **_READ_COMMITTED,
        # A rebalance moves only the partitions that change owner; the others keep their
        # batches in flight instead of being revoked and drained.
        "partition.assignment.strategy": "cooperative-sticky",
        # The bound after which a member that stopped polling loses its partitions (the
        # default, stated: the worker's saturation handling relies on polling well within it).
        "max.poll.interval.ms": 300_000,
        # Small prefetch: records already fetched are served in arrival order, so a large
        # prefetched run of batch-job records would hold real-time records back behind it.
        "max.partition.fetch.bytes": 64 * 1024,
        "fetch.max.bytes": 1024 * 1024,  # librdkafka: at least message.max.bytes
        "queued.max.messages.kbytes": 1024,
    },
    ConsumerRole.COMMITTED: {
        # The caller commits what it has processed (after a write-back, an ack), or nothing.
        "enable.auto.commit": False,
        # A new group must see everything still retained, not only what arrives from now on.
        "auto.offset.reset": "earliest",
        **_READ_COMMITTED,
    },
    ConsumerRole.READER: {
        # The reader picks its offsets itself (assign with explicit offsets); its group id is
        # a formality of librdkafka and should leave no committed offsets on the broker.
        "enable.auto.commit": False,
        **_READ_COMMITTED,
    },
    ConsumerRole.SNAPSHOT: {
        "enable.auto.commit": False,
        **_READ_COMMITTED,
        # Reading a log to its end (checkpoints, recently published ids) needs to know when
        # the end is reached, not to guess from a poll timeout.
        "enable.partition.eof": True,
    },
    ConsumerRole.SUBSCRIBER: {
        # What was shown is remembered roughly: a restarted subscriber of a named group goes
        # on near where it stopped, and no caller has to commit.
        "enable.auto.commit": True,
        # A subscriber watches what happens from now on, not the retained history.
        "auto.offset.reset": "latest",
        **_READ_COMMITTED,
    },
}


def producer_profile(role: ProducerRole) -> Config:
    """The role's own keys, without connection or security settings (a copy)."""
    return dict(_PRODUCER_PROFILES[role])


def consumer_profile(role: ConsumerRole) -> Config:
    """The role's own keys, without connection, security or group (a copy)."""
    return dict(_CONSUMER_PROFILES[role])


def throwaway_group(prefix: str) -> str:
    """A group id used once (``<prefix>-<8 hex>``): for readers, whose group keeps no state."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def producer_config(
    kafka: KafkaSettings,
    *,
    role: ProducerRole,
    client_id_suffix: str | None = None,
    transactional_id: str | None = None,
    transaction_timeout_ms: int = DEFAULT_TRANSACTION_TIMEOUT_MS,
    overrides: Mapping[str, ConfigValue] | None = None,
) -> Config:
    """The effective configuration of a producer of ``role`` (pure).

    ``transactional_id`` makes any role transactional (the worker's exactly-once mode is a
    :attr:`ProducerRole.LOW_LATENCY` producer with one); :attr:`ProducerRole.TRANSACTIONAL`
    requires it. ``transaction_timeout_ms`` applies only with a transactional id: an open
    transaction of a producer that died holds back every read_committed consumer until the
    broker aborts it, so the timeout bounds that stall.
    """
    if role is ProducerRole.TRANSACTIONAL and not transactional_id:
        raise ValueError("a transactional producer needs a transactional_id")
    if transaction_timeout_ms <= 0:
        raise ValueError(f"transaction_timeout_ms must be positive, got {transaction_timeout_ms}")
    config = _base(kafka, client_id_suffix)
    config.update(_PRODUCER_PROFILES[role])
    if transactional_id:
        config["transactional.id"] = transactional_id
        config["transaction.timeout.ms"] = transaction_timeout_ms
    config.update(overrides or {})
    return config


def consumer_config(
    kafka: KafkaSettings,
    *,
    group_id: str | None,
    role: ConsumerRole,
    client_id_suffix: str | None = None,
    group_instance_id: str | None = None,
    overrides: Mapping[str, ConfigValue] | None = None,
) -> Config:
    """The effective configuration of a consumer of ``role`` (pure).

    ``group_id=None`` gives a throwaway group (``sluiceway-<role>-<8 hex>``); librdkafka
    requires a group id even of a consumer that only assigns partitions.
    ``group_instance_id`` makes the member static: restarted under the same id within
    ``session.timeout.ms``, it keeps its partitions and the group does not rebalance.
    """
    config = _base(kafka, client_id_suffix)
    config.update(_CONSUMER_PROFILES[role])
    config["group.id"] = group_id if group_id else throwaway_group(f"sluiceway-{role.value}")
    if group_instance_id:
        config["group.instance.id"] = group_instance_id
    config.update(overrides or {})
    return config


def admin_config(
    kafka: KafkaSettings,
    *,
    client_id_suffix: str | None = None,
    overrides: Mapping[str, ConfigValue] | None = None,
) -> Config:
    """The effective configuration of an admin client (pure): connection and security."""
    config = _base(kafka, client_id_suffix)
    config.update(overrides or {})
    return config


def producer(
    kafka: KafkaSettings,
    *,
    role: ProducerRole,
    client_id_suffix: str | None = None,
    transactional_id: str | None = None,
    transaction_timeout_ms: int = DEFAULT_TRANSACTION_TIMEOUT_MS,
    overrides: Mapping[str, ConfigValue] | None = None,
) -> Producer:
    """A producer built from :func:`producer_config` (transactions are not initialised)."""
    return Producer(
        producer_config(
            kafka,
            role=role,
            client_id_suffix=client_id_suffix,
            transactional_id=transactional_id,
            transaction_timeout_ms=transaction_timeout_ms,
            overrides=overrides,
        )
    )


def consumer(
    kafka: KafkaSettings,
    *,
    group_id: str | None,
    role: ConsumerRole,
    client_id_suffix: str | None = None,
    overrides: Mapping[str, ConfigValue] | None = None,
) -> Consumer:
    """A consumer built from :func:`consumer_config` (nothing subscribed or assigned)."""
    return Consumer(
        consumer_config(
            kafka,
            group_id=group_id,
            role=role,
            client_id_suffix=client_id_suffix,
            overrides=overrides,
        )
    )


def admin(
    kafka: KafkaSettings,
    *,
    client_id_suffix: str | None = None,
    overrides: Mapping[str, ConfigValue] | None = None,
) -> AdminClient:
    """An admin client built from :func:`admin_config`."""
    config = admin_config(kafka, client_id_suffix=client_id_suffix, overrides=overrides)
    # confluent-kafka's stubs leave out the callables it accepts (oauth_cb) for admin clients.
    return AdminClient(config)  # type: ignore[arg-type]


def _base(kafka: KafkaSettings, client_id_suffix: str | None) -> Config:
    config: Config = dict(kafka.client_config())
    if kafka.oauth_token_file is not None:
        # confluent-kafka calls it from its background thread, also for admin clients.
        config["oauth_cb"] = file_token_callback(kafka.oauth_token_file)
    if client_id_suffix:
        # Broker logs, quotas and metrics tell the roles of one deployment apart by client id.
        config["client.id"] = f"{kafka.client_id}-{client_id_suffix}"
    return config


# ---------------------------------------------------------------- aiokafka and faust


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext:
    """The TLS context of ``kafka`` for Python clients: the CA (or the system's trust store),
    hostname verification, and the client certificate when mTLS is configured."""
    cafile = str(kafka.ssl_ca_location) if kafka.ssl_ca_location is not None else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if kafka.ssl_certificate_location is not None and kafka.ssl_key_location is not None:
        password = kafka.ssl_key_password
        context.load_cert_chain(
            str(kafka.ssl_certificate_location),
            str(kafka.ssl_key_location),
            password=password.get_secret_value() if password is not None else None,
        )
    return context


def oauth_token_provider(kafka: KafkaSettings) -> OidcTokenProvider | FileTokenProvider | None:
    """aiokafka's token provider for OAUTHBEARER settings; ``None`` for any other mechanism."""
    if kafka.sasl_mechanism != "OAUTHBEARER":
        return None
    if kafka.oauth_token_file is not None:
        return FileTokenProvider(kafka.oauth_token_file)
    # The settings validator guarantees endpoint, client id and secret with OAUTHBEARER.
    assert kafka.oauth_token_endpoint_url is not None
    assert kafka.oauth_client_id is not None
    assert kafka.oauth_client_secret is not None
    endpoint_tls = None
    if kafka.oauth_token_endpoint_url.startswith("https:") and kafka.ssl_ca_location is not None:
        endpoint_tls = ssl.create_default_context(cafile=str(kafka.ssl_ca_location))
    return OidcTokenProvider(
        kafka.oauth_token_endpoint_url,
        kafka.oauth_client_id,
        kafka.oauth_client_secret.get_secret_value(),
        kafka.oauth_scope,
        endpoint_tls,
    )


def aiokafka_security(kafka: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments of ``AIOKafkaProducer``/``AIOKafkaConsumer``/``AIOKafkaAdminClient``
    for the security in ``kafka`` (the connection itself is ``bootstrap_servers``)."""
    security: dict[str, Any] = {"security_protocol": kafka.security_protocol}
    if kafka.uses_tls():
        security["ssl_context"] = ssl_context(kafka)
    if kafka.sasl_mechanism is not None:
        security["sasl_mechanism"] = kafka.sasl_mechanism
    if kafka.sasl_username is not None and kafka.sasl_password is not None:
        security["sasl_plain_username"] = kafka.sasl_username
        security["sasl_plain_password"] = kafka.sasl_password.get_secret_value()
    provider = oauth_token_provider(kafka)
    if provider is not None:
        security["sasl_oauth_token_provider"] = provider
    return security


def faust_credentials(kafka: KafkaSettings) -> Any:
    """faust's ``broker_credentials`` for ``kafka``; ``None`` in plaintext.

    faust hands them to aiokafka as exactly the arguments :func:`aiokafka_security` builds.
    """
    from faust.auth import OAuthCredentials, SASLCredentials, SSLCredentials

    security = aiokafka_security(kafka)
    context = security.get("ssl_context")
    if kafka.sasl_mechanism == "OAUTHBEARER":
        return OAuthCredentials(oauth_cb=security["sasl_oauth_token_provider"], ssl_context=context)
    if kafka.sasl_mechanism is not None:
        return SASLCredentials(
            username=security["sasl_plain_username"],
            password=security["sasl_plain_password"],
            ssl_context=context,
            mechanism=kafka.sasl_mechanism,
        )
    if context is not None:
        return SSLCredentials(context)
    return None
