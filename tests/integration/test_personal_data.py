"""A PII feature's value leaves the worker nowhere: real Kafka, MinIO and Triton.

``invoice_risk`` is served with ``amount_eur`` marked ``pii: drop`` (and two other features
hashed and masked). Requests carry a canary in ``amount_eur`` and in a free attribute; some
are served, two are dead-lettered while holding it. A real worker runs as a process at DEBUG.
Then every object in the test's bucket, every record (key, value, headers) of the results,
reply and dead-letter topics, and the worker's log are searched for the canary, as text and
as the float64/float32 bytes Avro and numpy write.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import struct
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

import schemas
from devkit.modeling.invoices import FEATURES as INVOICE_RISK_FEATURES
from devkit.modeling.invoices import generate
from pipeline.kafka import clients
from pipeline.kafka.admin import (
    TopicSpec,
    control_topic_spec,
    end_offsets,
    ensure_topics,
    model_topic_specs,
)
from pipeline.kafka.clients import ConsumerRole
from pipeline.privacy import MASKED, ORIGINAL_HEADER, associated_data, open_original
from pipeline.settings import Settings
from pipeline.storage.client import ensure_bucket, make_client
from pipeline.topics import ModelTopics
from schemas.models import DeadLetter, InferenceRequest, InferenceResult, Inputs, ResultStatus
from tests.integration import traffic
from tests.integration.test_sap_connector import MAPPING as SAP_MAPPING
from tests.integration.test_sap_connector import MODEL as SAP_MODEL
from tests.integration.test_sap_connector import SYSTEM as SAP_SYSTEM
from tests.integration.test_sap_connector import Connector as SapConnectorProcess
from tests.integration.waiting import wait_for, wait_until
from tests.sap_server import SapProtocolServer, invoices_from_features
from workers.inference.runner import prepare_topics_and_bucket
from workers.processes import ServiceProcess

SERVED = 40
DEAD_LETTERED = 2
WORKER_COMMAND = (sys.executable, "-m", "sluiceway", "worker")
DLQ_OPEN_COMMAND = (sys.executable, "-m", "sluiceway", "dlq", "open", "--model", "invoice_risk")


def _bytes(value: str | bytes | None) -> bytes:
    return value.encode() if isinstance(value, str) else value or b""


def _record_contents(settings: Settings, topic: str) -> list[tuple[bytes, bytes, bytes]]:
    """Every record of ``topic`` as (key, value, headers joined), read to its end."""
    expected = sum(end_offsets(settings.kafka, topic).values())
    consumer = clients.consumer(
        settings.kafka, group_id=clients.throwaway_group("pii"), role=ConsumerRole.COMMITTED
    )
    consumer.subscribe([topic])
    records: list[tuple[bytes, bytes, bytes]] = []

    def read() -> bool:
        for message in consumer.consume(500, 0.5):
            if message.error() is None:
                raw = message.headers() or []
                pairs = raw.items() if isinstance(raw, dict) else raw
                headers = b"".join(name.encode() + b"=" + _bytes(value) for name, value in pairs)
                records.append((_bytes(message.key()), message.value() or b"", headers))
        return len(records) >= expected

    try:
        wait_for(read, 60, f"{expected} records of {topic}")
    finally:
        consumer.close()
    return records


def _dlq_position(settings: Settings, topic: str, letter: DeadLetter) -> tuple[int, int]:
    """Where ``letter`` sits in the DLQ: (partition, offset), what the CLI takes."""
    consumer = clients.consumer(
        settings.kafka, group_id=clients.throwaway_group("pii"), role=ConsumerRole.COMMITTED
    )
    consumer.subscribe([topic])
    found: list[tuple[int, int]] = []
    origin = (letter.original_topic, letter.original_partition, letter.original_offset)

    def read() -> bool:
        for message in consumer.consume(100, 0.5):
            if message.error() is None:
                seen = schemas.decode(message.value() or b"", DeadLetter)
                if (seen.original_topic, seen.original_partition, seen.original_offset) == origin:
                    found.append((int(message.partition() or 0), int(message.offset() or 0)))
        return bool(found)

    try:
        wait_for(read, 30, "the letter in the DLQ")
    finally:
        consumer.close()
    return found[0]


def test_a_pii_feature_value_appears_nowhere_the_worker_writes(
    settings: Settings, tmp_path: Path
) -> None:
    bucket = f"pii-{uuid.uuid4().hex[:12]}"
    settings = settings.model_copy(
        update={"object_store": settings.object_store.model_copy(update={"bucket": bucket})}
    )
    topics = ModelTopics(settings.namespace, "invoice_risk")
    replies = f"{settings.namespace}.replies.pii"
    ensure_topics(
        settings.kafka,
        [
            control_topic_spec(settings.namespace),
            *model_topic_specs(topics),
            TopicSpec(replies, partitions=1),
        ],
    )
    store = make_client(settings.object_store)
    ensure_bucket(store, bucket)

    # A unique amount, exact in float32 so every spelling of it is the same number.
    canary = float(random.randint(100_000, 999_999)) + 0.8125
    canary_text = repr(canary)
    attribute_canary = f"canary-{uuid.uuid4().hex}@example.com"
    spellings = [
        canary_text.encode(),
        struct.pack("<d", canary),
        struct.pack("<f", canary),
        attribute_canary.encode(),
    ]
    aes_key = os.urandom(32)
    model = {
        "backend": "triton",
        "default_version": "1",
        "feature_order": list(INVOICE_RISK_FEATURES),
        "explains": True,
        "echo_features": True,
        "pii": {"amount_eur": "drop", "vendor_tenure_days": "hash", "new_bank_account": "mask"},
    }

    def invoice(**override: Any) -> InferenceRequest:
        features: dict[str, Any] = {name: 1.0 for name in INVOICE_RISK_FEATURES}
        features.update(amount_eur=canary, vendor_tenure_days=400.0, payment_terms_days=30.0)
        features.update(override)
        return InferenceRequest(
            request_id=uuid.uuid4(),
            model="invoice_risk",
            inputs=Inputs(features=features),
            explain=True,
            reply_to=replies,
            attributes={"customer_email": attribute_canary},
        )

    served = [invoice() for _ in range(SERVED)]
    refused = [
        invoice(payment_terms_days="thirty"),  # another feature invalid, the canary beside it
        invoice(amount_eur=f"{canary_text} EUR"),  # the PII feature itself invalid
    ]
    traffic.publish_requests(settings, topics.requests, [*served, *refused])

    log_path = tmp_path / "worker.log"
    env = traffic.worker_env(
        settings,
        SLUICEWAY_MODELS=json.dumps({"invoice_risk": model}),
        SLUICEWAY_WORKERS__PII_HASH_KEY="integration-hash-key",
        SLUICEWAY_WORKERS__DEAD_LETTER_ORIGINAL="encrypt",
        SLUICEWAY_WORKERS__DEAD_LETTER_KEY=base64.b64encode(aes_key).decode(),
    )
    with log_path.open("ab") as log:
        worker = subprocess.Popen(
            [*WORKER_COMMAND, "--model", "invoice_risk", "--log-level", "DEBUG"],
            cwd=traffic.REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        got = traffic.collect(
            settings, topics.results, topics.dlq, SERVED + DEAD_LETTERED, timeout_s=90
        )
        wait_until(
            lambda: sum(end_offsets(settings.kafka, replies).values()) >= SERVED + DEAD_LETTERED,
            30,
            "every reply",
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(60)
    logged = log_path.read_bytes()
    assert code == 0, logged[-3000:].decode(errors="replace")

    # What may leave is there: every served request scored, the others dead-lettered.
    assert len(got.results) == SERVED
    assert {r.status for r in got.results} == {ResultStatus.OK}
    for result in got.results:
        assert result.outputs is not None
        assert [t.name for t in result.outputs.tensors or []] == ["score"]
        assert result.input_features is not None
        assert "amount_eur" not in result.input_features
        assert result.input_features["new_bank_account"] == MASKED
        assert str(result.input_features["vendor_tenure_days"]).startswith("hmac-sha256:")
        assert result.input_features["payment_terms_days"] == 30.0
        assert result.explanation is not None
        explained = {a.feature for a in result.explanation.attributions or []}
        assert explained
        assert not explained & {"amount_eur", "vendor_tenure_days", "new_bank_account"}
    hashes = {str(r.input_features["vendor_tenure_days"]) for r in got.results if r.input_features}
    assert len(hashes) == 1, "the hash is stable: equal values still join"
    assert sorted(letter.reason_code for letter in got.dead_letters) == ["invalid_feature"] * 2

    # The canary is nowhere: topics, objects, log.
    outgoing = {
        topic: _record_contents(settings, topic) for topic in (topics.results, replies, topics.dlq)
    }
    assert len(outgoing[topics.results]) == SERVED
    assert len(outgoing[replies]) == SERVED + DEAD_LETTERED
    assert len(outgoing[topics.dlq]) == DEAD_LETTERED
    for topic, records in outgoing.items():
        for key, value, headers in records:
            for spelt in spellings:
                assert spelt not in key + value + headers, f"canary {spelt!r} on {topic}"
    objects = list(store.list_objects(bucket, recursive=True))
    segment_keys = {r.payload_ref.key for r in got.results if r.payload_ref is not None}
    assert segment_keys <= {o.object_name for o in objects}
    for listed in objects:
        assert listed.object_name is not None
        response = store.get_object(bucket, listed.object_name)
        try:
            body = response.read()
        finally:
            response.close()
            response.release_conn()
        assert body
        for spelt in spellings:
            assert spelt not in listed.object_name.encode() + body, (
                f"canary {spelt!r} in {listed.object_name}"
            )
    assert b'level="DEBUG"' in logged, "the log was written at DEBUG"
    assert logged.count(b'reason="invalid_feature"') == DEAD_LETTERED, "refusals were logged"
    for spelt in spellings:
        assert spelt not in logged, f"canary {spelt!r} in the worker's log"

    # The operator can still open the sealed originals, and they hold the canary.
    for letter, (_, _, headers) in zip(
        sorted(got.dead_letters, key=lambda x: x.original_offset),
        sorted(
            outgoing[topics.dlq],
            key=lambda r: schemas.decode(r[1], DeadLetter).original_offset,
        ),
        strict=True,
    ):
        assert ORIGINAL_HEADER.encode() + b"=encrypted;key_id=" in headers
        assert letter.original_value is not None
        aad = associated_data(
            letter.original_topic, letter.original_partition, letter.original_offset
        )
        original = open_original(letter.original_value, [aes_key], aad)
        assert attribute_canary.encode() in original
        request = schemas.decode(original, InferenceRequest)
        assert request.attributes["customer_email"] == attribute_canary

    # ... and so can `sluiceway dlq open`, with the key from the settings.
    partition, offset = _dlq_position(settings, topics.dlq, got.dead_letters[0])
    opened = subprocess.run(
        [*DLQ_OPEN_COMMAND, "--partition", str(partition), "--offset", str(offset)],
        cwd=traffic.REPO_ROOT,
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert opened.returncode == 0, opened.stderr.decode(errors="replace")
    assert json.loads(opened.stdout)["attributes"]["customer_email"] == attribute_canary


# ---------------------------------------------------------------------- through the SAP connector

CONNECTOR_SERVED = 30


def test_a_pii_value_read_from_sap_appears_nowhere_the_connector_or_worker_writes(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SAP invoices whose ``InvoiceGrossAmount`` (-> ``amount_eur``, ``pii: drop``) is the
    canary are polled by the SAP connector and served by a real worker, both at DEBUG. One
    invoice the connector cannot map (its payment days are text), one the worker refuses (a
    feature beyond float32): both dead letters hold the canary, sealed."""
    bucket = f"pii-sap-{uuid.uuid4().hex[:12]}"
    aes_key = os.urandom(32)
    model = settings.models[SAP_MODEL].model_copy(
        update={"pii": {"amount_eur": "drop"}, "echo_features": True}
    )
    settings = settings.model_copy(
        update={
            "object_store": settings.object_store.model_copy(update={"bucket": bucket}),
            "models": {**settings.models, SAP_MODEL: model},
            "workers": settings.workers.model_copy(
                update={
                    "dead_letter_original": "encrypt",
                    "dead_letter_key": SecretStr(base64.b64encode(aes_key).decode()),
                }
            ),
        }
    )
    topics = ModelTopics(settings.namespace, SAP_MODEL)
    prepare_topics_and_bucket(settings, [SAP_MODEL])
    # Two decimals (the fixture writes amounts so), exact in float32: one number, every spelling.
    canary = float(random.randint(100_000, 999_999)) + 0.25
    canary_text = f"{canary:.2f}"
    spellings = [canary_text.encode(), struct.pack("<d", canary), struct.pack("<f", canary)]
    rows = generate(CONNECTOR_SERVED + 2, seed=23).x.copy()
    rows[:, 0] = canary  # amount_eur: the first feature column

    with SapProtocolServer(page_size=40) as sap:
        monkeypatch.setenv("SAP_USERNAME", sap.username)
        monkeypatch.setenv("SAP_PASSWORD", sap.password)
        keys = invoices_from_features(sap, rows)
        served, unmappable, refused = keys[:CONNECTOR_SERVED], keys[-2], keys[-1]
        assert sap.invoice(unmappable)["InvoiceGrossAmount"] == Decimal(canary_text)
        sap.add_invoice(**{**sap.invoice(unmappable), "NetPaymentDays": "thirty"})
        sap.add_invoice(**{**sap.invoice(refused), "YY1_PastLatePayments": 10**39})
        worker_log, connector_log = tmp_path / "worker.log", tmp_path / "connector.log"
        worker = ServiceProcess(
            settings, ["worker", "--model", SAP_MODEL, "--log-level", "DEBUG"], worker_log
        )
        connector = SapConnectorProcess(
            settings,
            sap,
            connector_log,
            SAP_MAPPING,
            "--poll-interval",
            "0.5",
            "--log-level",
            "DEBUG",
        )
        with worker:
            connector.start()
            try:
                wait_for(
                    lambda: (
                        len(sap.writes_by_key()) >= CONNECTOR_SERVED
                        and sum(end_offsets(settings.kafka, topics.dlq).values()) >= 2
                    ),
                    180,
                    f"{CONNECTOR_SERVED} writebacks and 2 dead letters\n{connector.process.tail()}",
                )
            finally:
                connector_code = connector.process.stop()
        worker_code = worker.process.returncode if worker.process else None
        writes = sap.writes_by_key()
    connector_logged = connector_log.read_bytes()
    worker_logged = worker_log.read_bytes()
    assert connector_code == 0, connector_logged[-3000:].decode(errors="replace")
    assert worker_code == 0, worker_logged[-3000:].decode(errors="replace")

    # What may leave is there: every mappable, servable invoice scored and written back once.
    assert set(writes) == set(served)
    assert all(len(w) == 1 for w in writes.values())
    outgoing = {topic: _record_contents(settings, topic) for topic in (topics.results, topics.dlq)}
    assert len(outgoing[topics.results]) == CONNECTOR_SERVED
    assert len(outgoing[topics.dlq]) == 2
    for _, value, _ in outgoing[topics.results]:
        result = schemas.decode(value, InferenceResult)
        assert result.status == ResultStatus.OK
        assert result.input_features is not None
        # The other seven features are echoed; the PII one is gone.
        assert set(result.input_features) == set(INVOICE_RISK_FEATURES) - {"amount_eur"}
    letters = {
        schemas.decode(value, DeadLetter).original_topic: (
            schemas.decode(value, DeadLetter),
            headers,
        )
        for _, value, headers in outgoing[topics.dlq]
    }
    assert set(letters) == {f"connector:{SAP_SYSTEM}", topics.requests}

    # The canary is nowhere: topics, objects, both logs.
    for topic, records in outgoing.items():
        for key, value, headers in records:
            for spelt in spellings:
                assert spelt not in key + value + headers, f"canary {spelt!r} on {topic}"
    store = make_client(settings.object_store)
    objects = list(store.list_objects(bucket, recursive=True))
    assert objects, "the worker wrote result segments"
    for listed in objects:
        assert listed.object_name is not None
        response = store.get_object(bucket, listed.object_name)
        try:
            body = response.read()
        finally:
            response.close()
            response.release_conn()
        for spelt in spellings:
            assert spelt not in listed.object_name.encode() + body, (
                f"canary in {listed.object_name}"
            )
    for name, logged in (("connector", connector_logged), ("worker", worker_logged)):
        assert b'level="DEBUG"' in logged, f"the {name} logged at DEBUG"
        for spelt in spellings:
            assert spelt not in logged, f"canary {spelt!r} in the {name}'s log"
    assert connector_logged.count(b'dead-lettered reason="invalid_field"') == 1
    assert worker_logged.count(b'reason="invalid_feature"') == 1

    # Both letters held the canary: sealed, and the operator's key opens them.
    for topic, (letter, headers) in letters.items():
        assert ORIGINAL_HEADER.encode() + b"=encrypted;key_id=" in headers
        assert letter.original_value is not None
        aad = associated_data(topic, letter.original_partition, letter.original_offset)
        original = open_original(letter.original_value, [aes_key], aad)
        if topic == topics.requests:
            assert letter.reason_code == "invalid_feature"
            request = schemas.decode(original, InferenceRequest)
            assert request.inputs.features is not None
            assert request.inputs.features["amount_eur"] == canary
        else:
            assert letter.reason_code == "invalid_field"
            assert "NetPaymentDays" in letter.reason_message
            assert json.loads(original)["InvoiceGrossAmount"] == canary_text

    # `sluiceway dlq open` gives the operator the connector's letter back as SAP sent it.
    connector_letter = letters[f"connector:{SAP_SYSTEM}"][0]
    partition, offset = _dlq_position(settings, topics.dlq, connector_letter)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEWAY_")}
    opened = subprocess.run(
        [*DLQ_OPEN_COMMAND, "--partition", str(partition), "--offset", str(offset)],
        cwd=traffic.REPO_ROOT,
        env={**environment, **settings.as_environment()},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert opened.returncode == 0, opened.stderr.decode(errors="replace")
    assert json.loads(opened.stdout)["NetPaymentDays"] == "thirty"


def test_the_sap_connector_refuses_a_pii_model_whose_letters_would_keep_raw_payloads(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = settings.models[SAP_MODEL].model_copy(update={"pii": {"amount_eur": "drop"}})
    settings = settings.model_copy(update={"models": {**settings.models, SAP_MODEL: model}})
    assert settings.workers.dead_letter_original == "keep"
    log = tmp_path / "connector.log"
    with SapProtocolServer() as sap:
        monkeypatch.setenv("SAP_USERNAME", sap.username)
        monkeypatch.setenv("SAP_PASSWORD", sap.password)
        connector = SapConnectorProcess(settings, sap, log, SAP_MAPPING, "--poll-interval", "0.5")
        connector.start()
        try:
            assert connector.process.process is not None
            code = connector.process.process.wait(60)
        finally:
            connector.process.stop()
        assert (sap.reads, sap.collection_queries) == (0, []), "refused before reading SAP"
    assert code != 0
    assert "model 'invoice_risk' has a pii policy" in log.read_text()
