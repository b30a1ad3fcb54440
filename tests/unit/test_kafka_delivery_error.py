"""One DeliveryError for the SDK and the async producer, saying "transient" the one way."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError as RdKafkaError

import pipeline.client
import pipeline.kafka.producer
from pipeline.kafka.exceptions import ClientError, DeliveryError, KafkaError


def test_the_sdk_and_the_producer_raise_the_same_type() -> None:
    assert pipeline.client.DeliveryError is DeliveryError
    assert pipeline.kafka.producer.DeliveryError is DeliveryError
    assert pipeline.client.ClientError is ClientError
    # SDK users catch ClientError; the worker and connectors catch KafkaError.
    assert issubclass(DeliveryError, ClientError)
    assert issubclass(DeliveryError, KafkaError)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (RdKafkaError(RdKafkaError._MSG_TIMED_OUT, retriable=True), True),
        (RdKafkaError(RdKafkaError.MSG_SIZE_TOO_LARGE), False),
        (RdKafkaError(RdKafkaError.TOPIC_AUTHORIZATION_FAILED), False),
    ],
    ids=["timed-out", "too-large", "not-authorised"],
)
def test_a_delivery_report_is_transient_exactly_when_librdkafka_says_retriable(
    error: RdKafkaError, transient: bool
) -> None:
    refused = DeliveryError.reported("inference.scaler.results", error)
    assert refused.transient is transient
    assert refused.topic == "inference.scaler.results"
    assert str(refused) == f"delivery to 'inference.scaler.results' failed: {error.str()}"
    assert not hasattr(refused, "retriable")


def test_the_sdk_names_the_request_it_sent() -> None:
    error = RdKafkaError(RdKafkaError.MSG_SIZE_TOO_LARGE)
    refused = DeliveryError.reported("inference.scaler.requests", error, "request r-1")
    assert str(refused) == f"request r-1: {error.str()}"
    assert refused.topic == "inference.scaler.requests"
