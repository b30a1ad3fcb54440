"""Wiring: build the connector's collaborators from settings, a mapping and the environment,
run the ingest and writeback loops on two threads, and stop both on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from collections.abc import Mapping as EnvMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Literal

import grpc
import httpx2
from confluent_kafka import Message, TopicPartition

import schemas
from connectors.common.checkpoint import CheckpointStore
from connectors.common.correlation import MissingSecretError, secrets_from_env
from connectors.common.dead_letters import (
    letter_privacy,
    letter_source_event,
    send_unmappable,
)
from connectors.common.dedupe import DedupeMetrics, RecentKeys
from connectors.common.exceptions import UnmappableRecord
from connectors.common.invalidation import invalidation_message
from connectors.common.mapping import load_mapping
from connectors.salesforce import cdc
from connectors.salesforce.auth import Authenticator, flow_from_env
from connectors.salesforce.config import (
    SourceConfig,
    input_fields,
    salesforce_sections,
    signer,
)
from connectors.salesforce.connector import (
    SOURCE_SYSTEM,
    IngestLoop,
    IngestStats,
    InvalidationNotice,
    Route,
    WritebackLoop,
    WritebackStats,
    WritebackTarget,
)
from connectors.salesforce.exceptions import ConfigurationError
from connectors.salesforce.limits import OrgLimitBreaker
from connectors.salesforce.pubsub import PubSubClient
from connectors.salesforce.rest import DEFAULT_API_VERSION, SalesforceRest
from pipeline.client import BrokerUnavailableError, SluicewayClient
from pipeline.kafka import clients
from pipeline.kafka.admin import (
    end_offsets,
    ensure_topics,
    invalidation_topic_spec,
    model_topic_specs,
)
from pipeline.kafka.clients import ConsumerRole, ProducerRole
from pipeline.settings import Settings
from pipeline.topics import ModelTopics
from schemas.exceptions import DecodeError
from schemas.identity import request_id_for
from schemas.models import InferenceRequest, Invalidation, InvalidationKind

log = logging.getLogger("sluiceway.connectors.salesforce")

DEFAULT_PUBSUB_ENDPOINT = "api.pubsub.salesforce.com:7443"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class ConnectorOptions:
    mapping: Path | tuple[Path, ...]
    """One mapping file, or several: one per entity, all on one channel."""
    name: str
    topic: str | None = None
    """Overrides the mappings' ``source.topic`` (e.g. ``/data/ChangeEvents``)."""
    pubsub_endpoint: str = DEFAULT_PUBSUB_ENDPOINT
    pubsub_insecure: bool = False
    """Plaintext gRPC: only for the local protocol test server."""
    api_version: str = DEFAULT_API_VERSION
    auth: Literal["client-credentials", "jwt"] | None = None
    writeback: bool = True
    ingest: bool = True
    reset_checkpoint: bool = False
    """Forget the stored replay id first, so ``source.replay_preset`` applies: the operator's
    answer to a rejected replay id (the connector never makes that choice itself)."""
    client_tag: str | None = None
    """The ``Sforce-Call-Options: client=<tag>`` of every write, by which the connector knows
    its own writeback in the change stream; default the connector's name. Two connectors
    writing to one org with different tags each skip only their own changes."""
    rate_limit_floor_s: float = 60.0
    """Seconds the org's breaker stays open after ``REQUEST_LIMIT_EXCEEDED``, at least."""
    dedupe_keys: int = 100_000
    """How many published keys the dedupe memory holds (seeded from the topics' tails)."""
    dedupe_max_age_s: float = 3 * 24 * 3600.0
    """How long a key is kept: Pub/Sub API keeps events 72 hours, so no redelivery is older."""
    dedupe_metrics: DedupeMetrics | None = None
    """Where the memory's size and evictions are reported (Prometheus), if anywhere."""

    @property
    def mapping_paths(self) -> tuple[Path, ...]:
        return self.mapping if isinstance(self.mapping, tuple) else (self.mapping,)

    @property
    def tag(self) -> str:
        return self.client_tag or self.name


@dataclass
class ConnectorStats:
    ingest: IngestStats | None
    writeback: WritebackStats | None


def _routes(
    settings: Settings, options: ConnectorOptions
) -> tuple[list[Route], dict[str, WritebackTarget], SourceConfig]:
    """The connector's mappings, checked against each other and the models they feed."""
    routes: list[Route] = []
    targets: dict[str, WritebackTarget] = {}
    channel: SourceConfig | None = None
    for path in options.mapping_paths:
        mapping = load_mapping(path)
        source, writeback = salesforce_sections(mapping)
        if options.topic:
            source = source.model_copy(update={"topic": options.topic})
        if channel is None:
            channel = source
        elif source.topic != channel.topic:
            raise ConfigurationError(
                f"{path}: channel {source.topic} differs from {channel.topic}; one connector "
                "reads one channel (a multi-entity one such as /data/ChangeEvents, or --topic)"
            )
        model = settings.models.get(mapping.model)
        if model is None:
            raise ConfigurationError(f"mapping model {mapping.model!r} is not in settings.models")
        missing = mapping.missing_features(model.feature_order)
        if missing:
            raise ConfigurationError(
                f"{path}: the mapping does not fill features {missing} of model {mapping.model!r}"
            )
        try:
            mapping.entity_id({"Id": "001000000000000AAA"})
        except UnmappableRecord:
            raise ConfigurationError(
                f"{path}: entity_id must be built from {{Id}} alone (a delete carries nothing else)"
            ) from None
        entity = mapping.entity_type
        if any(route.entity == entity for route in routes):
            raise ConfigurationError(f"{path}: a second mapping for {entity}")
        own = cdc.OwnChanges(
            client_id=options.tag,
            integration_users=frozenset(source.integration_users),
            writeback_fields=frozenset(writeback.fields) if writeback else frozenset(),
        )
        routes.append(Route(entity, mapping, source, input_fields(mapping), own))
        if writeback is not None:
            targets[entity] = WritebackTarget(mapping.model, writeback)
    assert channel is not None, "at least one mapping"
    return routes, targets, channel


def seed_memory(
    settings: Settings,
    topics: list[str],
    memory: RecentKeys,
    timeout_s: float = 15.0,
    *,
    letter_topics: Sequence[str] = (),
) -> int:
    """Remember what the connector wrote before it (re)started: the last ``memory.max_keys``
    records of each requests and invalidations topic in ``topics``, and of each DLQ in
    ``letter_topics`` (by the source-event header alone: a letter is neither decoded nor
    opened), so an event the crashed run published or dead-lettered but did not checkpoint
    is a duplicate, not a second request or letter."""
    sources: list[tuple[str, Callable[[Message], str | None]]] = [
        *((topic, _published_key) for topic in topics),
        *((topic, _letter_key) for topic in letter_topics),
    ]
    consumer = clients.consumer(
        settings.kafka,
        group_id=clients.throwaway_group("salesforce-seed"),
        role=ConsumerRole.READER,
    )
    seeded = 0
    try:
        for topic, key_of in sources:
            ends = end_offsets(settings.kafka, topic, timeout_s)
            wanted = {p: end for p, end in ends.items() if end > 0}
            if not wanted:
                continue
            consumer.assign(
                [
                    TopicPartition(topic, p, max(0, end - memory.max_keys))
                    for p, end in wanted.items()
                ]
            )
            deadline = time.monotonic() + timeout_s
            while wanted and time.monotonic() < deadline:
                for message in consumer.consume(500, 0.5):
                    if message.error() is not None:
                        continue
                    key = key_of(message)
                    if key is not None:
                        memory.add(key)
                        seeded += 1
                    partition = int(message.partition() or 0)
                    if int(message.offset() or 0) >= wanted.get(partition, 0) - 1:
                        wanted.pop(partition, None)
    finally:
        consumer.close()
    return seeded


def _letter_key(message: Message) -> str | None:
    return letter_source_event(message.headers())


def _published_key(message: Message) -> str | None:
    try:
        event = schemas.decode(message.value() or b"")
    except DecodeError:
        return None
    if isinstance(event, InferenceRequest) and event.source and event.source.system:
        return f"request:{event.request_id}"
    if isinstance(event, Invalidation) and event.source_event_id:
        return f"invalidation:{event.model}:{event.source_event_id}"
    return None


class SalesforceConnector:
    """Both loops of one connector, started and stopped together."""

    def __init__(
        self, settings: Settings, options: ConnectorOptions, environ: EnvMapping[str, str]
    ) -> None:
        if not _NAME.match(options.name):
            raise ConfigurationError(f"connector name {options.name!r}: letters, digits, _.- only")
        if not _NAME.match(options.tag):
            raise ConfigurationError(f"client tag {options.tag!r}: letters, digits, _.- only")
        self.settings = settings
        self.options = options
        try:
            # Before anything is opened: without a secret the connector does not start.
            self.signer = signer(options.name, secrets_from_env(environ, options.name))
        except MissingSecretError as missing:
            raise ConfigurationError(str(missing)) from None
        routes, targets, channel = _routes(settings, options)
        # Before anything is opened: a model with a pii policy whose letters would keep raw
        # payloads is refused, as its worker refuses it.
        privacy = {route.model: letter_privacy(settings, route.model) for route in routes}
        self.routes = routes
        self.http = httpx2.Client(timeout=30.0)
        self.auth = Authenticator(flow_from_env(environ, kind=options.auth), self.http)
        self.limits = OrgLimitBreaker(floor_s=options.rate_limit_floor_s)
        self.rest = SalesforceRest(
            self.auth,
            self.http,
            api_version=options.api_version,
            client_id=options.tag,
            limits=self.limits,
        )
        models = list(dict.fromkeys(route.model for route in routes))
        for model in models:
            ensure_topics(
                settings.kafka,
                [
                    *model_topic_specs(ModelTopics(settings.namespace, model)),
                    invalidation_topic_spec(ModelTopics(settings.namespace, model)),
                ],
            )
        self.client = SluicewayClient(settings, client_id=f"salesforce-{options.name}")
        self.checkpoints = CheckpointStore(settings, f"salesforce-{options.name}")
        self._producer = clients.producer(settings.kafka, role=ProducerRole.RELIABLE)
        self.ingest: IngestLoop | None = None
        self.writeback: WritebackLoop | None = None
        if options.reset_checkpoint:
            self.checkpoints.ensure_topic()
            self.checkpoints.clear(channel.topic)
            log.warning(
                'event="checkpoint_reset" topic="%s" replay_preset="%s"',
                channel.topic,
                channel.replay_preset,
            )

        def dead_letter(
            model: str,
            payload: bytes,
            why: UnmappableRecord,
            record_id: str | None,
            source_event: str | None,
        ) -> None:
            send_unmappable(
                settings,
                model=model,
                source_payload=payload,
                reason_code=why.reason_code,
                message=why.message,
                source_system=SOURCE_SYSTEM,
                producer=self._producer,
                source_key=record_id,
                connector=f"salesforce-{options.name}",
                privacy=privacy.get(model),
                source_event=source_event,
            )

        if options.ingest:
            channel_ = (
                grpc.insecure_channel(options.pubsub_endpoint)
                if options.pubsub_insecure
                else grpc.secure_channel(options.pubsub_endpoint, grpc.ssl_channel_credentials())
            )
            pubsub = PubSubClient(channel_, lambda: self.auth.session().pubsub())
            memory = RecentKeys(
                max_keys=options.dedupe_keys,
                max_age_s=options.dedupe_max_age_s,
                name=f"salesforce-{options.name}",
                metrics=options.dedupe_metrics,
            )
            seeded = seed_memory(
                settings,
                [
                    topic
                    for model in models
                    for topic in (
                        ModelTopics(settings.namespace, model).requests,
                        ModelTopics(settings.namespace, model).invalidations,
                    )
                ],
                memory,
                letter_topics=[ModelTopics(settings.namespace, model).dlq for model in models],
            )
            log.info('event="dedupe_memory_seeded" keys="%d"', seeded)
            self.ingest = IngestLoop(
                name=options.name,
                signer=self.signer,
                routes=routes,
                channel=channel.topic,
                replay_preset=channel.replay_preset,
                batch_size=channel.batch_size,
                pubsub=pubsub,
                rest=self.rest,
                publisher=self.client,
                invalidations=self._publish_invalidations,
                checkpoints=self.checkpoints,
                dead_letter=dead_letter,
                memory=memory,
            )
        if options.writeback and targets:
            consumer = clients.consumer(
                settings.kafka, group_id=self.writeback_group, role=ConsumerRole.COMMITTED
            )
            consumer.subscribe(
                [
                    ModelTopics(settings.namespace, target.model).results
                    for target in targets.values()
                ]
            )
            self.writeback = WritebackLoop(
                name=options.name,
                signer=self.signer,
                targets=targets,
                consumer=consumer,
                rest=self.rest,
                dead_letter=dead_letter,
            )

    @property
    def writeback_group(self) -> str:
        """The writeback's consumer group (group ids are cluster-wide: namespaced)."""
        return f"{self.settings.namespace}.connector.salesforce-{self.options.name}.writeback"

    def _publish_invalidations(self, notices: Sequence[InvalidationNotice]) -> None:
        """Write the invalidations, keyed by entity, and wait for every ack."""
        failures: list[str] = []
        for notice in notices:
            invalidation = Invalidation(
                event_id=request_id_for(SOURCE_SYSTEM, f"invalidation:{notice.source_event_id}"),
                model=notice.model,
                entity_key=notice.entity_key,
                kind=InvalidationKind.DELETED,
                source_system=SOURCE_SYSTEM,
                source_event_id=notice.source_event_id,
                occurred_at=datetime.fromtimestamp(notice.occurred_at_ms / 1000, UTC),
                connector=f"salesforce-{self.options.name}",
                reason=notice.reason,
            )
            key, value, headers = invalidation_message(invalidation)
            kafka_headers: list[tuple[str, str | bytes | None]] = list(headers)
            self._producer.produce(
                ModelTopics(self.settings.namespace, notice.model).invalidations,
                value,
                key=key,
                headers=kafka_headers,
                on_delivery=lambda error, _message: (
                    failures.append(error.str()) if error is not None else None
                ),
            )
        if self._producer.flush(15.0) or failures:
            raise BrokerUnavailableError(
                f"invalidations not acknowledged: {failures[0] if failures else 'timeout'}"
            )

    def stop(self) -> None:
        if self.ingest is not None:
            self.ingest.stop()
        if self.writeback is not None:
            self.writeback.stop()

    def run(self) -> ConnectorStats:
        """Run until :meth:`stop` (or a fatal error in either loop, which stops the other)."""
        errors: list[BaseException] = []

        def guard(target: IngestLoop | WritebackLoop) -> None:
            try:
                target.run()
            except BaseException as exc:
                errors.append(exc)
                self.stop()

        threads = [
            threading.Thread(target=guard, args=(loop,), name=f"salesforce-{kind}", daemon=True)
            for kind, loop in (("ingest", self.ingest), ("writeback", self.writeback))
            if loop is not None
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
        self.close()
        if errors:
            raise errors[0]
        return ConnectorStats(
            self.ingest.stats if self.ingest else None,
            self.writeback.stats if self.writeback else None,
        )

    def close(self) -> None:
        if self.writeback is not None:
            self.writeback.consumer.close()
        if self.ingest is not None:
            self.ingest.pubsub.close()
        self.client.close()
        self.checkpoints.close()
        self._producer.flush(10)
        self.http.close()


def run_connector(settings: Settings, options: ConnectorOptions) -> ConnectorStats:
    """Run until SIGTERM or SIGINT; secrets are read from ``os.environ`` only."""
    connector = SalesforceConnector(settings, options, os.environ)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info('event="stopping" signal="%s"', signal.Signals(signum).name)
        connector.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return connector.run()
