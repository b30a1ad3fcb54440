"""The Salesforce connector as an org drives it: several entities on ``/data/ChangeEvents``,
deletes and merges, redeliveries and restarts, the org's API limit and refused writes.
Against the real broker and the Salesforce protocol test server (not Salesforce itself)."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import schemas
from connectors.common.correlation import ENV_VARIABLE
from connectors.salesforce.config import correlation_id, signer
from connectors.salesforce.connector import IngestStats
from connectors.salesforce.exceptions import ConfigurationError
from connectors.salesforce.runner import ConnectorOptions, SalesforceConnector
from connectors.sap.history import dead_lettered_events
from pipeline.kafka.admin import ensure_topics, model_topic_specs
from pipeline.settings import ModelSettings, Settings
from pipeline.topics import ModelTopics
from schemas.models import (
    DeadLetter,
    InferenceRequest,
    InferenceResult,
    Invalidation,
    InvalidationKind,
    Outputs,
    ResultStatus,
    Tensor,
    TensorDatatype,
)
from tests.integration.test_salesforce_connector import _read_all, _record_id
from tests.integration.traffic import publish
from tests.integration.waiting import polled, wait_for
from tests.salesforce_server import (
    ALL_CHANGES,
    SUPPLIER_INVOICE_FIELDS,
    SalesforceOrg,
    SalesforceProtocolServer,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
INVOICE_MAPPING = REPO_ROOT / "connectors/salesforce/mappings/supplier_invoice_risk.yaml"
INVOICE = "Supplier_Invoice__c"
INVOICE_MODEL = "invoice_risk"
ACCOUNT = "Account"
ACCOUNT_MODEL = "account_risk"
ACCOUNT_FIELDS: dict[str, Any] = {
    "Name": "string",
    "AnnualRevenue": "double",
    "NumberOfEmployees": "double",
    "BillingAddress": {"Street": "string", "City": "string", "PostalCode": "string"},
    "Risk_Score__c": "double",
    "LastModifiedDate": "long",
    "SystemModstamp": "long",
}
CONTACT_FIELDS = {"Email": "string", "LastModifiedDate": "long", "SystemModstamp": "long"}
ACCOUNT_FEATURES = ("revenue", "revenue_missing", "employees", "in_lyon")
ACCOUNT_MAPPING: dict[str, Any] = {
    "model": ACCOUNT_MODEL,
    "source_system": "salesforce",
    "entity_type": ACCOUNT,
    "entity_id": "{Id}",
    "features": {
        "revenue": {"path": "AnnualRevenue", "type": "float"},
        "revenue_missing": {"path": "AnnualRevenue__IsNull", "type": "float"},
        "employees": {"path": "NumberOfEmployees", "type": "float", "default": 0},
        "in_lyon": {
            "path": "BillingAddress.City",
            "type": "float",
            "default": 0,
            "transform": {"map": {"Lyon": 1}, "map_default": 0},
        },
    },
    "source": {
        "topic": ALL_CHANGES,
        "replay_preset": "EARLIEST",
        # A revenue nulled in Salesforce reaches the model as -1 (with its flag), never as
        # a silent default.
        "null_values": {"AnnualRevenue": -1},
    },
    "writeback": {"fields": {"Risk_Score__c": "tensor:score"}},
}
SECRET = "salesforce-org-test-secret-0123456789abcdef"
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
"""Since when a DLQ is read back for its source-event headers: from its start."""
TAG = "risk-scorer"


@pytest.fixture
def server() -> Iterator[SalesforceProtocolServer]:
    """An org with invoices, accounts and contacts all on the standard channel."""
    with SalesforceProtocolServer() as running:
        for entity, fields in (
            (INVOICE, SUPPLIER_INVOICE_FIELDS),
            (ACCOUNT, ACCOUNT_FIELDS),
            ("Contact", CONTACT_FIELDS),
        ):
            running.org.enable_cdc(entity, fields, standard_channel=True)
        yield running


@pytest.fixture
def two_models(settings: Settings) -> Settings:
    models = {**settings.models, ACCOUNT_MODEL: ModelSettings(feature_order=ACCOUNT_FEATURES)}
    return settings.model_copy(update={"models": models})


def _env(org: SalesforceOrg) -> dict[str, str]:
    return {
        "SALESFORCE_LOGIN_URL": org.login_url,
        "SALESFORCE_CLIENT_ID": org.client_id,
        "SALESFORCE_CLIENT_SECRET": org.client_secret,
        ENV_VARIABLE: SECRET,
    }


def _mappings(tmp_path: Path, account: dict[str, Any] | None = None) -> tuple[Path, Path]:
    account_file = tmp_path / "account_risk.yaml"
    account_file.write_text(yaml.safe_dump(account or ACCOUNT_MAPPING))
    return INVOICE_MAPPING, account_file


def _options(
    server: SalesforceProtocolServer, mappings: tuple[Path, ...], **overrides: Any
) -> ConnectorOptions:
    fields: dict[str, Any] = {
        "mapping": mappings,
        "name": "inproc",
        "topic": ALL_CHANGES,
        "pubsub_endpoint": server.pubsub_target,
        "pubsub_insecure": True,
        "client_tag": TAG,
        **overrides,
    }
    return ConnectorOptions(**fields)


def _run_until(connector: SalesforceConnector, done: Callable[[], bool], what: str) -> None:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            connector.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        wait_for(polled(lambda: bool(errors) or done()), 90, what)
    finally:
        connector.stop()
        thread.join(30)
    assert errors == []


def _ingest(settings: Settings, org: SalesforceOrg, options: ConnectorOptions) -> IngestStats:
    """Run the ingest loop until it checkpointed the channel's last event."""
    connector = SalesforceConnector(settings, options, _env(org))
    assert connector.ingest is not None
    stats = connector.ingest.stats
    latest = org.latest_replay_id(ALL_CHANGES)
    _run_until(connector, lambda: stats.last_replay_id == latest, "the channel handled")
    return stats


def _decoded(settings: Settings, topic: str, kind: type[Any]) -> list[Any]:
    return [schemas.decode(value, kind) for value in _read_all(settings, topic)]


def _invoice(index: int, **changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "Amount_EUR__c": 1000.0 + index,
        "Vendor_Tenure_Days__c": 400.0,
        "Payment_Terms_Days__c": 30.0,
        "Days_To_Due__c": 12.0,
        "Past_Late_Payments__c": 0.0,
        "New_Bank_Account__c": False,
        "Foreign_Vendor__c": False,
        "Manual_Entry__c": False,
    }
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


def test_a_mixed_entity_stream_ends_with_one_outcome_per_event_and_a_restart_adds_nothing(
    two_models: Settings, server: SalesforceProtocolServer, tmp_path: Path
) -> None:
    settings, org = two_models, server.org
    account_a, account_b = "001A00000000001", "001A00000000002"
    # 1-3: invoices, one the mapping cannot read (no amount).
    org.change(INVOICE, "CREATE", [_record_id(0)], _invoice(0))
    org.change(INVOICE, "CREATE", [_record_id(1)], _invoice(1))
    org.change(INVOICE, "CREATE", [_record_id(2)], _invoice(2, Amount_EUR__c=None))
    # 4-5: accounts, scored with the account model from their own fields.
    org.change(
        ACCOUNT,
        "CREATE",
        [account_a],
        {"AnnualRevenue": 5e6, "NumberOfEmployees": 40.0, "BillingAddress.City": "Paris"},
    )
    org.change(
        ACCOUNT, "CREATE", [account_b], {"AnnualRevenue": 1e6, "BillingAddress.City": "Lyon"}
    )
    # 6-7: contacts: no mapping, skipped and counted.
    org.change("Contact", "CREATE", ["003C1"], {"Email": "c@example.com"})
    org.change("Contact", "UPDATE", ["003C1"], {"Email": "d@example.com"})
    # 8: revenue nulled (nulledFields); 9: only the compound BillingAddress.City changed.
    org.change(ACCOUNT, "UPDATE", [account_a], {"AnnualRevenue": None})
    org.change(ACCOUNT, "UPDATE", [account_a], {"BillingAddress.City": "Lyon"})
    # 10: an invoice deleted.
    org.change(INVOICE, "DELETE", [_record_id(1)])
    # 11-12: account B merged into A: UPDATE of A, DELETE of B.
    org.merge(ACCOUNT, account_a, [account_b], {"NumberOfEmployees": 45.0})
    # 13: the first event delivered again (same replay id, same event uuid).
    org.redeliver(ALL_CHANGES, org.topics[ALL_CHANGES].events[0][0])
    # 14: the connector's own writeback (its client tag); 15: another integration's write.
    assert org.write(ACCOUNT, account_a, {"Risk_Score__c": 0.9}, client=TAG, user="005X") is None
    assert (
        org.write(
            INVOICE, _record_id(0), {"Amount_EUR__c": 123.0}, client="other-tool", user="005Y"
        )
        is None
    )
    # 16: the deleted invoice restored.
    org.change(INVOICE, "UNDELETE", [_record_id(1)])
    assert len(org.topics[ALL_CHANGES].events) == 16

    options = _options(server, _mappings(tmp_path))
    stats = _ingest(settings, org, options)

    assert stats.events == 16
    assert stats.outcomes == {
        "request": 9,
        "invalidation": 2,
        "duplicate": 1,
        "skipped": 3,
        "dead_letter": 1,
    }
    assert sum(stats.outcomes.values()) == stats.events
    assert stats.skipped == {"no_mapping": 2, "own_writeback": 1}
    assert stats.by_entity == {INVOICE: 7, ACCOUNT: 7, "Contact": 2}
    table = stats.outcome_table()
    assert [line.split() for line in table.splitlines()] == [
        ["request", "9"],
        ["invalidation", "2"],
        ["duplicate", "1"],
        ["skipped", "3"],
        ["dead_letter", "1"],
        ["events", "16"],
    ]

    invoice_topics = ModelTopics(settings.namespace, INVOICE_MODEL)
    account_topics = ModelTopics(settings.namespace, ACCOUNT_MODEL)
    invoice_requests = _decoded(settings, invoice_topics.requests, InferenceRequest)
    account_requests = _decoded(settings, account_topics.requests, InferenceRequest)
    assert Counter(r.source.entity_id for r in invoice_requests) == {
        _record_id(0): 2,
        _record_id(1): 2,
    }
    assert Counter(r.source.entity_id for r in account_requests) == {account_a: 4, account_b: 1}
    assert all(r.model == ACCOUNT_MODEL for r in account_requests)
    features_of_a = Counter(
        tuple(sorted((r.inputs.features or {}).items()))
        for r in account_requests
        if r.source.entity_id == account_a
    )
    created = {"revenue": 5e6, "revenue_missing": 0.0, "employees": 40.0, "in_lyon": 0.0}
    # The updates are read through REST (the events do not carry every input), after all
    # the changes: the revenue nulled reaches the model as configured with its flag set, and
    # the compound city is read from REST's "city" as from CDC's "City".
    now = {"revenue": -1.0, "revenue_missing": 1.0, "employees": 45.0, "in_lyon": 1.0}
    assert features_of_a == {tuple(sorted(created.items())): 1, tuple(sorted(now.items())): 3}
    assert all(
        r.correlation_id
        == correlation_id(
            signer("inproc", (SECRET.encode(),)), ACCOUNT, r.source.entity_id, r.request_id
        )
        for r in account_requests
    )

    invalidations = _decoded(settings, invoice_topics.invalidations, Invalidation) + _decoded(
        settings, account_topics.invalidations, Invalidation
    )
    assert sorted((i.model, i.entity_key, i.kind, i.reason) for i in invalidations) == [
        (ACCOUNT_MODEL, account_b, InvalidationKind.DELETED, "delete"),
        (INVOICE_MODEL, _record_id(1), InvalidationKind.DELETED, "delete"),
    ]
    letters = _decoded(settings, invoice_topics.dlq, DeadLetter)
    assert [(d.reason_code, d.original_key) for d in letters] == [
        ("missing_field", _record_id(2).encode())
    ]
    unmappable_event = org.topics[ALL_CHANGES].events[2][1]
    assert dead_lettered_events(settings, invoice_topics.dlq, EPOCH) == {
        f"letter:{unmappable_event}:{_record_id(2)}"
    }

    # A restart that reads the whole channel again (the checkpoint forgotten) publishes no
    # request, no invalidation and no dead letter a second time: the memory is seeded from
    # the topics (the DLQ by its letters' source-event headers).
    again = _ingest(settings, org, _options(server, _mappings(tmp_path), reset_checkpoint=True))
    assert again.outcomes == {
        "request": 0,
        "invalidation": 0,
        "duplicate": 13,
        "skipped": 3,
        "dead_letter": 0,
    }
    assert sum(again.outcomes.values()) == again.events == 16
    assert again.dead_lettered == 0
    assert len(_read_all(settings, invoice_topics.dlq)) == 1
    assert len(_read_all(settings, account_topics.dlq)) == 0
    assert len(_read_all(settings, invoice_topics.requests)) == 4
    assert len(_read_all(settings, account_topics.requests)) == 5
    assert len(_read_all(settings, invoice_topics.invalidations)) == 1
    assert len(_read_all(settings, account_topics.invalidations)) == 1


def _result(model: str, sobject: str, record_id: str) -> InferenceResult:
    request_id = uuid.uuid4()
    return InferenceResult(
        request_id=request_id,
        correlation_id=correlation_id(
            signer("inproc", (SECRET.encode(),)), sobject, record_id, request_id
        ),
        status=ResultStatus.OK,
        model=model,
        model_version="3",
        outputs=Outputs(
            tensors=[
                Tensor(
                    name="score",
                    datatype=TensorDatatype.FP32,
                    shape=[1, 1],
                    data=np.array([0.25], dtype="<f4").tobytes(),
                )
            ]
        ),
    )


def test_the_org_limit_holds_every_call_for_the_floor_and_refused_writes_are_dead_lettered(
    two_models: Settings, server: SalesforceProtocolServer, tmp_path: Path
) -> None:
    settings, org = two_models, server.org
    org.change(INVOICE, "CREATE", [_record_id(0)], _invoice(0))
    for account in ("001A00000000001", "001A00000000009"):
        org.change(ACCOUNT, "CREATE", [account], {"AnnualRevenue": 1.0})
    # A validation rule refuses every write of one account, naming the field.
    org.refuse_writes("001A00000000009", "FIELD_CUSTOM_VALIDATION_EXCEPTION", ["Risk_Score__c"])
    results = [
        _result(INVOICE_MODEL, INVOICE, _record_id(0)),
        _result(ACCOUNT_MODEL, ACCOUNT, "001A00000000001"),
        _result(ACCOUNT_MODEL, ACCOUNT, "001A00000000009"),
    ]
    for model in (INVOICE_MODEL, ACCOUNT_MODEL):
        ensure_topics(settings.kafka, model_topic_specs(ModelTopics(settings.namespace, model)))
    for result in results:
        topic = ModelTopics(settings.namespace, result.model).results
        publish(settings, topic, [(None, schemas.encode(result))])
    org.fail_next(2, 403, "REQUEST_LIMIT_EXCEEDED")
    before = len(org.rest_requests)

    options = _options(server, _mappings(tmp_path), ingest=False, rate_limit_floor_s=1.0)
    connector = SalesforceConnector(settings, options, _env(org))
    assert (
        connector.writeback_group == f"{settings.namespace}.connector.salesforce-inproc.writeback"
    )
    assert connector.writeback is not None
    stats = connector.writeback.stats
    _run_until(
        connector,
        lambda: stats.written + stats.dead_lettered == 3 and stats.commits >= 1,
        "every result written or dead-lettered",
    )

    assert Counter(w.record_id for w in org.writes if w.client == TAG) == {
        _record_id(0): 1,
        "001A00000000001": 1,
    }
    assert (stats.written, stats.dead_lettered, stats.rate_limited) == (2, 1, 2)
    assert stats.failed == {"FIELD_CUSTOM_VALIDATION_EXCEPTION": 1}
    assert connector.limits.stats.refusals == 2
    assert connector.limits.stats.opened == 1
    # After each refusal nothing was sent before the breaker's hold (1 s, then 2 s) ended.
    calls = list(zip(org.rest_requests[before:], org.rest_request_times[before:], strict=True))
    refused = [i for i, ((_, _, status), _) in enumerate(calls) if status == 403]
    assert len(refused) == 2
    for index, hold in zip(refused, (1.0, 2.0), strict=True):
        assert calls[index + 1][1] - calls[index][1] >= hold

    letters = _decoded(settings, ModelTopics(settings.namespace, ACCOUNT_MODEL).dlq, DeadLetter)
    assert [(d.reason_code, d.original_key) for d in letters] == [
        ("writeback_refused", b"001A00000000009")
    ]
    refusal = json.loads(letters[0].original_value or b"{}")
    assert refusal["error_code"] == "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    assert refusal["fields"] == ["Risk_Score__c"]
    assert refusal["result"]["request_id"] == str(results[2].request_id)
    assert refusal["values"] == {"Risk_Score__c": 0.25}
    encoded = base64.b64decode(refusal["result_base64"])
    assert schemas.decode(encoded, InferenceResult) == results[2]


def test_a_mapping_that_does_not_fill_its_model_or_reads_another_channel_is_refused(
    two_models: Settings, server: SalesforceProtocolServer, tmp_path: Path
) -> None:
    org = server.org
    partial = {**ACCOUNT_MAPPING, "features": dict(ACCOUNT_MAPPING["features"])}
    del partial["features"]["in_lyon"]
    with pytest.raises(ConfigurationError, match=r"does not fill features \['in_lyon'\]"):
        SalesforceConnector(two_models, _options(server, _mappings(tmp_path, partial)), _env(org))
    own_channel = {**ACCOUNT_MAPPING, "source": {"topic": "/data/AccountChangeEvent"}}
    with pytest.raises(ConfigurationError, match="one connector reads one channel"):
        SalesforceConnector(
            two_models,
            _options(server, _mappings(tmp_path, own_channel), topic=None),
            _env(org),
        )
