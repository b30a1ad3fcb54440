"""Wiring: build the connector's collaborators from settings, a mapping and the environment,
run the ingest and writeback loops on two threads, and stop both on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from collections.abc import Mapping as EnvMapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Literal

import grpc
import httpx2

from connectors.common.checkpoint import CheckpointStore
from connectors.common.correlation import MissingSecretError, secrets_from_env
from connectors.common.dead_letters import send_unmappable
from connectors.common.exceptions import UnmappableRecord
from connectors.common.mapping import load_mapping
from connectors.salesforce import cdc
from connectors.salesforce.auth import Authenticator, flow_from_env
from connectors.salesforce.config import input_fields, salesforce_sections, signer
from connectors.salesforce.connector import (
    SOURCE_SYSTEM,
    IngestLoop,
    IngestStats,
    WritebackLoop,
    WritebackStats,
)
from connectors.salesforce.exceptions import ConfigurationError
from connectors.salesforce.pubsub import PubSubClient
from connectors.salesforce.rest import DEFAULT_API_VERSION, SalesforceRest
from pipeline.client import SluicewayClient
from pipeline.kafka import clients
from pipeline.kafka.admin import ensure_topics, model_topic_specs
from pipeline.kafka.clients import ConsumerRole, ProducerRole
from pipeline.settings import Settings
from pipeline.topics import ModelTopics

log = logging.getLogger("sluiceway.connectors.salesforce")

DEFAULT_PUBSUB_ENDPOINT = "api.pubsub.salesforce.com:7443"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class ConnectorOptions:
    mapping: Path
    name: str
    topic: str | None = None
    """Overrides the mapping's ``source.topic``."""
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


@dataclass
class ConnectorStats:
    ingest: IngestStats | None
    writeback: WritebackStats | None


class SalesforceConnector:
    """Both loops of one connector, started and stopped together."""

    def __init__(
        self, settings: Settings, options: ConnectorOptions, environ: EnvMapping[str, str]
    ) -> None:
        if not _NAME.match(options.name):
            raise ConfigurationError(f"connector name {options.name!r}: letters, digits, _.- only")
        self.settings = settings
        self.options = options
        try:
            # Before anything is opened: without a secret the connector does not start.
            self.signer = signer(options.name, secrets_from_env(environ, options.name))
        except MissingSecretError as missing:
            raise ConfigurationError(str(missing)) from None
        mapping = load_mapping(options.mapping)
        source, writeback = salesforce_sections(mapping)
        if options.topic:
            source = source.model_copy(update={"topic": options.topic})
        if mapping.model not in settings.models:
            raise ConfigurationError(f"mapping model {mapping.model!r} is not in settings.models")
        self.http = httpx2.Client(timeout=30.0)
        self.auth = Authenticator(flow_from_env(environ, kind=options.auth), self.http)
        self.rest = SalesforceRest(
            self.auth, self.http, api_version=options.api_version, client_id=options.name
        )
        topics = ModelTopics(settings.namespace, mapping.model)
        ensure_topics(settings.kafka, model_topic_specs(topics))
        self.client = SluicewayClient(settings, client_id=f"salesforce-{options.name}")
        self.checkpoints = CheckpointStore(settings, f"salesforce-{options.name}")
        self._dlq_producer = clients.producer(settings.kafka, role=ProducerRole.RELIABLE)
        self.ingest: IngestLoop | None = None
        self.writeback: WritebackLoop | None = None
        fields = input_fields(mapping)
        if options.reset_checkpoint:
            self.checkpoints.ensure_topic()
            self.checkpoints.clear(source.topic)
            log.warning(
                'event="checkpoint_reset" topic="%s" replay_preset="%s"',
                source.topic,
                source.replay_preset,
            )
        if options.ingest:
            channel = (
                grpc.insecure_channel(options.pubsub_endpoint)
                if options.pubsub_insecure
                else grpc.secure_channel(options.pubsub_endpoint, grpc.ssl_channel_credentials())
            )
            pubsub = PubSubClient(channel, lambda: self.auth.session().pubsub())
            own = cdc.OwnChanges(
                client_id=options.name,
                integration_users=frozenset(source.integration_users),
                writeback_fields=frozenset(writeback.fields) if writeback else frozenset(),
            )

            def dead_letter(payload: bytes, why: UnmappableRecord, record_id: str | None) -> None:
                send_unmappable(
                    settings,
                    model=mapping.model,
                    source_payload=payload,
                    reason_code=why.reason_code,
                    message=why.message,
                    source_system=SOURCE_SYSTEM,
                    producer=self._dlq_producer,
                    source_key=record_id,
                    connector=f"salesforce-{options.name}",
                )

            self.ingest = IngestLoop(
                name=options.name,
                signer=self.signer,
                mapping=mapping,
                source=source,
                own_changes=own,
                input_fields=fields,
                pubsub=pubsub,
                rest=self.rest,
                publisher=self.client,
                checkpoints=self.checkpoints,
                dead_letter=dead_letter,
            )
        if options.writeback and writeback is not None:
            consumer = clients.consumer(
                settings.kafka,
                group_id=f"sluiceway-salesforce-{options.name}",
                role=ConsumerRole.COMMITTED,
            )
            consumer.subscribe([topics.results])
            self.writeback = WritebackLoop(
                name=options.name,
                signer=self.signer,
                config=writeback,
                consumer=consumer,
                rest=self.rest,
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
        self._dlq_producer.flush(10)
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
