"""The one way a connector writes to Kafka: requests, invalidations and dead letters, each call
returning once the broker acknowledged everything it was given.

Requests go through the SDK client (:class:`~pipeline.client.SluicewayClient`): its
``publish_many`` already holds the message-key rule, the publish spans and the typed errors
(``BrokerUnavailableError``, ``DeliveryError``), so a connector publishes exactly as any other
SDK caller does. Invalidations and dead letters are other contracts on other topics; they go
through one ``acks=all`` producer of the connector's own. Calls block: the Salesforce loops
call them on their threads, the SAP connector from asyncio through ``asyncio.to_thread``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from confluent_kafka import Producer

from connectors.common.dead_letters import LetterPrivacy, send_unmappable
from connectors.common.invalidation import invalidation_message
from pipeline.client import BrokerUnavailableError, SluicewayClient
from pipeline.kafka import clients
from pipeline.kafka.clients import ProducerRole
from pipeline.settings import Settings
from pipeline.topics import ModelTopics
from schemas.errors import UnservableRecord
from schemas.models import DeadLetter, InferenceRequest, Invalidation


class ConnectorPublisher:
    """Publishes for one connector (``connector``: its name in letters and client ids).

    ``letters``: the producer of invalidations and dead letters; default one made here.
    """

    def __init__(
        self, settings: Settings, connector: str, *, letters: Producer | None = None
    ) -> None:
        self.settings = settings
        self.connector = connector
        self.producer = letters or clients.producer(settings.kafka, role=ProducerRole.RELIABLE)
        self._client: SluicewayClient | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> SluicewayClient:
        """The SDK client, made at first use: a connector that only dead-letters (or has not
        published yet) holds no request producer."""
        with self._lock:
            if self._client is None:
                self._client = SluicewayClient(self.settings, client_id=self.connector)
            return self._client

    def requests(self, requests: Sequence[InferenceRequest], timeout_s: float = 30.0) -> None:
        """Publish requests to their models' requests topics; raises the SDK's errors."""
        if requests:
            self.client.publish_many(requests, timeout_s)

    def invalidations(self, invalidations: Sequence[Invalidation], timeout_s: float = 15.0) -> None:
        """Publish invalidations to their models' invalidations topics, keyed by entity like
        the entity's requests; :class:`BrokerUnavailableError` unless every one is acked."""
        failures: list[str] = []
        for invalidation in invalidations:
            key, value, headers = invalidation_message(invalidation)
            kafka_headers: list[tuple[str, str | bytes | None]] = list(headers)
            self.producer.produce(
                ModelTopics(self.settings.namespace, invalidation.model).invalidations,
                value,
                key=key,
                headers=kafka_headers,
                on_delivery=lambda error, _message: (
                    failures.append(error.str()) if error is not None else None
                ),
            )
        if self.producer.flush(timeout_s) or failures:
            raise BrokerUnavailableError(
                f"invalidations not acknowledged: {failures[0] if failures else 'timeout'}"
            )

    def dead_letter(
        self,
        *,
        model: str,
        payload: bytes,
        why: UnservableRecord,
        source_system: str,
        privacy: LetterPrivacy | None,
        source_key: str | None = None,
        source_headers: dict[str, str] | None = None,
        request_id: str | None = None,
        source_event: str | None = None,
    ) -> DeadLetter:
        """Write one letter to the model's DLQ (reason code and message from ``why``) and wait
        for its ack; returns it as written (protected: safe to log). Raises
        ``DeadLetterError`` unless acked."""
        return send_unmappable(
            self.settings,
            model=model,
            source_payload=payload,
            reason_code=why.reason_code,
            message=why.message,
            source_system=source_system,
            producer=self.producer,
            source_key=source_key,
            source_headers=source_headers,
            request_id=request_id,
            connector=self.connector,
            privacy=privacy,
            source_event=source_event,
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self.producer.flush(10)
