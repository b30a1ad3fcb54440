"""The Salesforce connector against the real broker, a real worker and the Salesforce protocol
test server (``tests/salesforce_server.py``): nothing here is Salesforce itself."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from confluent_kafka import TopicPartition

import schemas
from connectors.common.checkpoint import CheckpointStore, position_bytes
from connectors.common.correlation import ENV_VARIABLE
from connectors.salesforce.auth import Authenticator, ClientCredentials, JwtBearer
from connectors.salesforce.config import correlation_id, signer
from connectors.salesforce.connector import SOURCE_SYSTEM
from connectors.salesforce.exceptions import (
    AuthenticationError,
    RateLimitedError,
    ReplayIdRejectedError,
)
from connectors.salesforce.limits import OrgLimitBreaker
from connectors.salesforce.rest import RecordUpdate, SalesforceRest
from connectors.salesforce.runner import ConnectorOptions, SalesforceConnector
from devkit.modeling.invoices import generate
from pipeline.kafka import clients
from pipeline.kafka.admin import end_offsets
from pipeline.kafka.clients import ConsumerRole
from pipeline.resilience.retry import RetryPolicy
from pipeline.settings import Settings
from pipeline.topics import ModelTopics
from schemas.identity import request_id_for
from schemas.models import (
    DeadLetter,
    InferenceRequest,
    InferenceResult,
    Outputs,
    ResultStatus,
    Tensor,
    TensorDatatype,
)
from tests.integration.traffic import publish
from tests.integration.waiting import polled, wait_for
from tests.salesforce_server import (
    INTEGRATION_USER_ID,
    SUPPLIER_INVOICE_FIELDS,
    SalesforceOrg,
    SalesforceProtocolServer,
)
from workers.inference.runner import prepare_topics_and_bucket
from workers.processes import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
MAPPING = REPO_ROOT / "connectors/salesforce/mappings/supplier_invoice_risk.yaml"
ENTITY = "Supplier_Invoice__c"
TOPIC = "/data/Supplier_Invoice__ChangeEvent"
MODEL = "invoice_risk"
FIELD_OF_FEATURE = {
    "amount_eur": "Amount_EUR__c",
    "vendor_tenure_days": "Vendor_Tenure_Days__c",
    "payment_terms_days": "Payment_Terms_Days__c",
    "days_to_due": "Days_To_Due__c",
    "past_late_payments": "Past_Late_Payments__c",
    "new_bank_account": "New_Bank_Account__c",
    "foreign_vendor": "Foreign_Vendor__c",
    "manual_entry": "Manual_Entry__c",
}
BOOLEAN_FIELDS = {"New_Bank_Account__c", "Foreign_Vendor__c", "Manual_Entry__c"}
SECRET = "salesforce-connector-test-secret-0123456789"
"""The connectors' signing secret (``SLUICEWAY_CONNECTOR_SECRET``)."""
SIGNER = signer("inproc", (SECRET.encode(),))


@pytest.fixture
def salesforce(monkeypatch: pytest.MonkeyPatch) -> Iterator[SalesforceOrg]:
    """A running protocol server with CDC on the invoice object; the connector's credentials
    in the environment, as in production."""
    with SalesforceProtocolServer() as server:
        server.org.enable_cdc(ENTITY, SUPPLIER_INVOICE_FIELDS)
        monkeypatch.setenv("SALESFORCE_LOGIN_URL", server.url)
        monkeypatch.setenv("SALESFORCE_CLIENT_ID", server.org.client_id)
        monkeypatch.setenv("SALESFORCE_CLIENT_SECRET", server.org.client_secret)
        monkeypatch.setenv("SF_TEST_PUBSUB", server.pubsub_target)
        yield server.org


def _pubsub_target() -> str:
    import os

    return os.environ["SF_TEST_PUBSUB"]


def _invoice_values(count: int, seed: int = 11) -> list[dict[str, Any]]:
    data = generate(count, seed)
    rows = []
    for row in data.x:
        values: dict[str, Any] = {}
        for index, feature in enumerate(FIELD_OF_FEATURE):
            name = FIELD_OF_FEATURE[feature]
            values[name] = bool(row[index]) if name in BOOLEAN_FIELDS else float(row[index])
        rows.append(values)
    return rows


def _record_id(index: int) -> str:
    return f"a0B{index:015d}"


def _create(org: SalesforceOrg, index: int, values: dict[str, Any]) -> bytes:
    return org.change(ENTITY, "CREATE", [_record_id(index)], values, transaction_key=f"tx-{index}")


def _expected_request_id(index: int) -> uuid.UUID:
    return request_id_for(SOURCE_SYSTEM, f"{ENTITY}:tx-{index}:1:{_record_id(index)}")


def _read_all(settings: Settings, topic: str) -> list[bytes]:
    """Every message value of ``topic`` up to its current end."""
    ends = end_offsets(settings.kafka, topic)
    consumer = clients.consumer(
        settings.kafka, group_id=f"reader-{uuid.uuid4().hex[:8]}", role=ConsumerRole.READER
    )
    values: list[bytes] = []
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p, end in ends.items() if end > 0])
        remaining = {p: end for p, end in ends.items() if end > 0}
        deadline = time.monotonic() + 60
        while remaining and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                if message.error() is not None:
                    continue
                values.append(message.value() or b"")
                partition = int(message.partition() or 0)
                if int(message.offset() or 0) >= remaining.get(partition, 0) - 1:
                    remaining.pop(partition, None)
        assert not remaining, f"could not read {topic} to its end"
    finally:
        consumer.close()
    return values


def _requests(settings: Settings) -> list[InferenceRequest]:
    topic = ModelTopics(settings.namespace, MODEL).requests
    return [schemas.decode(value, InferenceRequest) for value in _read_all(settings, topic)]


def _request_count(settings: Settings) -> int:
    return sum(
        end_offsets(settings.kafka, ModelTopics(settings.namespace, MODEL).requests).values()
    )


def _checkpoint(settings: Settings, name: str) -> bytes | None:
    stored = CheckpointStore(settings, f"salesforce-{name}").load().get(TOPIC)
    return position_bytes(stored) if stored else None


def _connector_process(settings: Settings, name: str, log: Path, *extra: str) -> ServiceProcess:
    return ServiceProcess(
        settings,
        [
            "connect-salesforce",
            "--mapping",
            str(MAPPING),
            "--name",
            name,
            "--pubsub-endpoint",
            _pubsub_target(),
            "--pubsub-insecure",
            *extra,
        ],
        log,
        extra_environment={ENV_VARIABLE: SECRET},
    )


def _options(mapping: Path = MAPPING, **overrides: Any) -> ConnectorOptions:
    fields: dict[str, Any] = {
        "mapping": mapping,
        "name": "inproc",
        "pubsub_endpoint": _pubsub_target(),
        "pubsub_insecure": True,
        **overrides,
    }
    return ConnectorOptions(**fields)


def _run_in_thread(connector: SalesforceConnector) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            connector.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


# ---------------------------------------------------------------------------- end to end


def test_a_cdc_stream_is_scored_and_every_record_written_back_exactly_once(
    settings: Settings, salesforce: SalesforceOrg, tmp_path: Path
) -> None:
    count = 1000
    prepare_topics_and_bucket(settings, [MODEL])
    invoices = _invoice_values(count)
    for index in range(count // 2):
        _create(salesforce, index, invoices[index])
    # Rate limits and an unavailable instance on the first writes: backed off, not lost.
    salesforce.fail_next(2, 403, "REQUEST_LIMIT_EXCEEDED")
    salesforce.fail_next(2, 503, "SERVER_UNAVAILABLE")
    # The session ends mid-stream, whatever the machine's speed: at the moment the 250th record
    # write is applied, so the writes after it must re-authenticate once.
    expire_at = count // 4
    salesforce.expire_tokens_after_writes(expire_at)
    worker = ServiceProcess(settings, ["worker", "--model", MODEL], tmp_path / "worker.log")
    # The org breaker's hold is seconds here, not the default minute (doubling with each refusal
    # in a row): the test is about nothing being lost or doubled, and the breaker's timing is
    # unit-tested with a fake clock (test_salesforce_connector_logic.py).
    connector = _connector_process(
        settings, "e2e", tmp_path / "connector.log", "--rate-limit-floor-s", "1"
    )
    with worker, connector:
        for index in range(count // 2, count):  # the rest while the connector runs
            _create(salesforce, index, invoices[index])

        @polled
        def all_written() -> bool:
            assert not connector.exited(), connector.tail()
            return len({w.record_id for w in salesforce.writes}) >= count

        wait_for(all_written, 240, f"{count} records written back")
        # The writebacks come back as change events; the connector reads and skips them.
        latest = salesforce.latest_replay_id(TOPIC)
        wait_for(lambda: _checkpoint(settings, "e2e") == latest, 60, "checkpoint at the tip")
        assert connector.stop() == 0, connector.tail()

    writes_per_record = Counter(w.record_id for w in salesforce.writes)
    assert set(writes_per_record) == {_record_id(i) for i in range(count)}
    assert set(writes_per_record.values()) == {1}, "a record was written back twice"
    for write in salesforce.writes:
        assert write.client == "e2e"
        assert write.user == INTEGRATION_USER_ID
        assert 0.0 < write.fields["Risk_Score__c"] < 1.0
        assert write.fields["Risk_Model_Version__c"] == "1"
        assert write.fields["Risk_Request_Id__c"] == str(
            _expected_request_id(int(write.record_id[3:]))
        )
    requests = _requests(settings)
    assert len(requests) == count
    assert {r.request_id for r in requests} == {_expected_request_id(i) for i in range(count)}
    by_record = {r.source.entity_id: r for r in requests if r.source is not None}
    assert by_record[_record_id(7)].inputs.features == pytest.approx(
        {f: float(invoices[7][FIELD_OF_FEATURE[f]]) for f in FIELD_OF_FEATURE}
    )
    log = connector.tail(12)
    assert f"events={2 * count} requests={count} invalidations=0 duplicates=0" in log
    assert f"'own_writeback': {count}" in log
    # The summary's per-event outcome table: every event has one outcome.
    table = [line.split() for line in log.splitlines()]
    for outcome, events in (("request", count), ("skipped", count), ("events", 2 * count)):
        assert [outcome, str(events)] in table
    # Every kind of refusal happened on the way, and none lost or doubled a write.
    assert {403, 503, 401} <= {status for _, _, status in salesforce.rest_requests}
    # The session expired mid-writeback: a call was refused with 401, the connector
    # re-authenticated, and writes were accepted again after it.
    assert salesforce.tokens_expired_at_write == expire_at
    statuses = [(method, status) for method, _, status in salesforce.rest_requests]
    refused = next(i for i, (_, status) in enumerate(statuses) if status == 401)
    assert ("PATCH", 200) in statuses[refused + 1 :], "no write after re-authenticating"
    assert salesforce.token_requests.count("client_credentials") >= 2
    assert salesforce.max_outstanding <= 100


def test_a_killed_connector_resumes_without_duplicate_or_missing_requests(
    settings: Settings, salesforce: SalesforceOrg, tmp_path: Path
) -> None:
    count = 1000
    prepare_topics_and_bucket(settings, [MODEL])
    invoices = _invoice_values(count, seed=5)
    connector = _connector_process(settings, "killed", tmp_path / "c.log", "--no-writeback")
    with connector:
        for index in range(300):
            _create(salesforce, index, invoices[index])
        wait_for(lambda: _request_count(settings) >= 200, 120, "200 requests")
        connector.stop(signal.SIGKILL)
        before = _checkpoint(settings, "killed")
        for index in range(300, 600):  # changes while the connector is down
            _create(salesforce, index, invoices[index])
        connector.start()
        for index in range(600, count):  # and after it is back
            _create(salesforce, index, invoices[index])
        latest = salesforce.latest_replay_id(TOPIC)
        wait_for(lambda: _checkpoint(settings, "killed") == latest, 120, "checkpoint at the tip")
        assert connector.stop() == 0, connector.tail()

    # The restart resumed after the stored replay id, never at LATEST.
    assert [preset for _, preset, _ in salesforce.subscriptions] == ["EARLIEST", "CUSTOM"]
    assert salesforce.subscriptions[1][2] == before
    requests = _requests(settings)
    ids = Counter(r.request_id for r in requests)
    assert set(ids) == {_expected_request_id(i) for i in range(count)}, "an event was missed"
    # Requests published but not yet checkpointed when the process died are published again
    # with the same id (the same request), at most one credit window of them.
    assert len(requests) - count <= 100
    first: dict[uuid.UUID, InferenceRequest] = {}
    for request in requests:
        assert first.setdefault(request.request_id, request) == request


# ---------------------------------------------------------------------------- CDC semantics


def test_change_data_capture_semantics_reach_kafka_as_documented(
    settings: Settings, salesforce: SalesforceOrg
) -> None:
    prepare_topics_and_bucket(settings, [MODEL])
    base = _invoice_values(8, seed=3)
    org = salesforce
    # 1. A record the mapping cannot read: dead-lettered with its payload.
    broken = {k: v for k, v in base[7].items() if k != "Amount_EUR__c"}
    _create(org, 7, broken)
    # 2. One event naming three records: three requests.
    org.change(ENTITY, "CREATE", [_record_id(1), _record_id(2), _record_id(3)], base[0])
    for index in (4, 5, 6):
        _create(org, index, base[index])
    # 3. An update of one input: the rest of the record is read through REST.
    org.change(ENTITY, "UPDATE", [_record_id(1)], {"Amount_EUR__c": 99_000.0})
    # 4. A gap event carries no values: the record is read through REST.
    org.change(ENTITY, "GAP_UPDATE", [_record_id(2)], {"Days_To_Due__c": -12.0})
    # 5. The connector's own writeback is skipped.
    own = org.write(
        ENTITY,
        _record_id(3),
        {"Risk_Score__c": 0.4},
        client="inproc",
        user=INTEGRATION_USER_ID,
    )
    assert own is None
    # 6. A delete is nothing to score: it invalidates the record's score.
    org.change(ENTITY, "DELETE", [_record_id(6)])
    # 7. Too many changes to describe: the entity is resynchronised through SOQL, from the
    # overflow's second on (SOQL datetimes have whole seconds: a resync reads more, never less).
    org.change(ENTITY, "GAP_OVERFLOW", [_record_id(4), _record_id(5)], {"Manual_Entry__c": True})
    overflow_ms = max(org.records[ENTITY][_record_id(i)]["SystemModstamp"] for i in (4, 5))
    since_ms = overflow_ms // 1000 * 1000
    resynced = {
        record_id
        for record_id, record in org.records[ENTITY].items()
        if record["SystemModstamp"] >= since_ms and (ENTITY, record_id) not in org.deleted
    }

    connector = SalesforceConnector(
        settings,
        _options(writeback=False),
        {
            "SALESFORCE_LOGIN_URL": org.login_url,
            "SALESFORCE_CLIENT_ID": org.client_id,
            "SALESFORCE_CLIENT_SECRET": org.client_secret,
            ENV_VARIABLE: SECRET,
        },
    )
    thread, errors = _run_in_thread(connector)
    latest = org.latest_replay_id(TOPIC)
    assert connector.ingest is not None
    stats = connector.ingest.stats
    wait_for(
        polled(lambda: stats.last_replay_id == latest or bool(errors)), 60, "the stream handled"
    )
    connector.stop()
    thread.join(30)
    assert errors == []

    requests = _requests(settings)
    by_record = Counter(r.source.entity_id for r in requests if r.source is not None)
    expected = Counter(
        {
            _record_id(1): 2,
            _record_id(2): 2,
            _record_id(3): 1,
            _record_id(4): 1,
            _record_id(5): 1,
            _record_id(6): 1,
        }
    )
    for record_id in resynced - {_record_id(7)}:
        expected[record_id] += 1
    assert by_record == expected
    updated = [r for r in requests if r.source and r.source.entity_id == _record_id(1)][-1]
    assert updated.inputs.features is not None
    assert updated.inputs.features["amount_eur"] == 99_000.0
    assert updated.inputs.features["vendor_tenure_days"] == pytest.approx(
        base[0]["Vendor_Tenure_Days__c"]
    )
    gap = [r for r in requests if r.source and r.source.entity_id == _record_id(2)][-1]
    assert gap.inputs.features is not None
    assert gap.inputs.features["days_to_due"] == -12.0
    assert all(
        r.correlation_id == correlation_id(SIGNER, ENTITY, r.source.entity_id, r.request_id)
        for r in requests
        if r.source is not None
    )
    assert stats.skipped == {"own_writeback": 1}
    assert stats.invalidations == 1
    assert sum(stats.outcomes.values()) == stats.events
    assert stats.resyncs == 1
    reads = [p for m, p, s in org.rest_requests if m == "GET"]
    assert f"/services/data/v62.0/composite/sobjects/{ENTITY}" in reads
    assert "/services/data/v62.0/query" in reads
    letters = [
        schemas.decode(value, DeadLetter)
        for value in _read_all(settings, ModelTopics(settings.namespace, MODEL).dlq)
    ]
    dead_lettered_again = 1 if _record_id(7) in resynced else 0
    assert [(d.reason_code, d.original_key) for d in letters] == [
        ("missing_field", _record_id(7).encode())
    ] * (1 + dead_lettered_again)
    assert b"Vendor_Tenure_Days__c" in (letters[0].original_value or b"")


def test_a_broken_stream_resubscribes_after_the_checkpoint(
    settings: Settings, salesforce: SalesforceOrg
) -> None:
    prepare_topics_and_bucket(settings, [MODEL])
    values = _invoice_values(40)
    for index in range(20):
        _create(salesforce, index, values[index])
    env = {
        "SALESFORCE_LOGIN_URL": salesforce.login_url,
        "SALESFORCE_CLIENT_ID": salesforce.client_id,
        "SALESFORCE_CLIENT_SECRET": salesforce.client_secret,
        ENV_VARIABLE: SECRET,
    }
    connector = SalesforceConnector(settings, _options(writeback=False), env)
    thread, errors = _run_in_thread(connector)
    assert connector.ingest is not None
    stats = connector.ingest.stats
    first_half = salesforce.latest_replay_id(TOPIC)
    wait_for(polled(lambda: stats.last_replay_id == first_half or bool(errors)), 60, "20 events")
    salesforce.break_streams()
    for index in range(20, 40):
        _create(salesforce, index, values[index])
    latest = salesforce.latest_replay_id(TOPIC)
    wait_for(polled(lambda: stats.last_replay_id == latest or bool(errors)), 60, "40 events")
    connector.stop()
    thread.join(30)
    assert errors == []
    assert stats.resubscribes >= 1
    assert salesforce.subscriptions[0][1] == "EARLIEST"
    assert all(preset == "CUSTOM" for _, preset, _ in salesforce.subscriptions[1:])
    requests = _requests(settings)
    assert Counter(r.request_id for r in requests) == Counter(
        {_expected_request_id(i): 1 for i in range(40)}
    )


@pytest.mark.parametrize("cause", ["corrupt", "expired"])
def test_a_rejected_replay_id_stops_with_an_alert_and_never_falls_back_to_latest(
    settings: Settings, salesforce: SalesforceOrg, cause: str, caplog: pytest.LogCaptureFixture
) -> None:
    prepare_topics_and_bucket(settings, [MODEL])
    values = _invoice_values(3)
    replays = [_create(salesforce, i, values[i]) for i in range(3)]
    stored = b"\xde\xad\xbe\xef" if cause == "corrupt" else replays[0]
    if cause == "expired":
        salesforce.expire_replay_ids_before(TOPIC, replays[2])
    store = CheckpointStore(settings, "salesforce-inproc")
    store.ensure_topic()  # before the first save, or the broker auto-creates it unsuited
    store.save(TOPIC, stored)
    env = {
        "SALESFORCE_LOGIN_URL": salesforce.login_url,
        "SALESFORCE_CLIENT_ID": salesforce.client_id,
        "SALESFORCE_CLIENT_SECRET": salesforce.client_secret,
        ENV_VARIABLE: SECRET,
    }
    connector = SalesforceConnector(settings, _options(writeback=False), env)
    with pytest.raises(ReplayIdRejectedError) as rejected:
        connector.run()
    assert rejected.value.error_code == (
        "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted"
    )
    assert salesforce.subscriptions == [(TOPIC, "CUSTOM", stored)]
    assert _request_count(settings) == 0
    assert any('alert="true"' in record.getMessage() for record in caplog.records)
    # The operator's decision: forget the replay id and start at the mapping's preset.
    salesforce.subscriptions.clear()
    connector = SalesforceConnector(settings, _options(writeback=False, reset_checkpoint=True), env)
    thread, errors = _run_in_thread(connector)
    wait_for(polled(lambda: _request_count(settings) >= 1 or bool(errors)), 60, "a request")
    connector.stop()
    thread.join(30)
    assert errors == []
    assert salesforce.subscriptions[0][:2] == (TOPIC, "EARLIEST")


# ---------------------------------------------------------------------------- writeback


def _result(record_id: str, *, connector: str = "inproc", ok: bool = True) -> InferenceResult:
    request_id = uuid.uuid4()
    return InferenceResult(
        request_id=request_id,
        correlation_id=correlation_id(
            signer(connector, (SECRET.encode(),)), ENTITY, record_id, request_id
        ),
        status=ResultStatus.OK if ok else ResultStatus.ERROR,
        error_code=None if ok else "backend_error",
        model=MODEL,
        model_version="2",
        outputs=Outputs(
            tensors=[
                Tensor(
                    name="score",
                    datatype=TensorDatatype.FP32,
                    shape=[1, 1],
                    data=np.array([0.75], dtype="<f4").tobytes(),
                )
            ]
        )
        if ok
        else None,
    )


def test_results_are_written_once_and_record_failures_stay_with_their_record(
    settings: Settings, salesforce: SalesforceOrg, tmp_path: Path
) -> None:
    prepare_topics_and_bucket(settings, [MODEL])
    values = _invoice_values(3)
    for index in range(3):
        _create(salesforce, index, values[index])
    salesforce.change(ENTITY, "DELETE", [_record_id(1)])
    results_topic = ModelTopics(settings.namespace, MODEL).results
    batch = [
        _result(_record_id(0)),
        _result(_record_id(1)),  # deleted meanwhile: ENTITY_IS_DELETED, for this record only
        _result(_record_id(2), ok=False),  # failed inference: nothing written
        _result(_record_id(2), connector="someone-else"),
    ]
    publish(settings, results_topic, ((None, schemas.encode(r)) for r in batch))
    env = {
        "SALESFORCE_LOGIN_URL": salesforce.login_url,
        "SALESFORCE_CLIENT_ID": salesforce.client_id,
        "SALESFORCE_CLIENT_SECRET": salesforce.client_secret,
        ENV_VARIABLE: SECRET,
    }

    def run_writeback_until(results: int) -> Any:
        connector = SalesforceConnector(settings, _options(ingest=False), env)
        thread, errors = _run_in_thread(connector)
        assert connector.writeback is not None
        stats = connector.writeback.stats
        wait_for(
            polled(lambda: bool(errors) or (stats.results >= results and stats.commits >= 1)),
            60,
            f"{results} results handled and committed",
        )
        connector.stop()
        thread.join(30)
        assert errors == []
        return stats

    first = run_writeback_until(3)
    assert [(w.record_id, w.fields) for w in salesforce.writes] == [
        (
            _record_id(0),
            {
                "Risk_Score__c": 0.75,
                "Risk_Model_Version__c": "2",
                "Risk_Request_Id__c": str(batch[0].request_id),
            },
        )
    ]
    assert first.failed == {"ENTITY_IS_DELETED": 1}
    assert first.dead_lettered == 1
    assert (first.results, first.not_ok) == (3, 1)
    # A restart continues after the committed offsets; a result delivered again (a crash
    # between the write and the commit) is recognised by the marker field: nothing twice.
    publish(
        settings,
        results_topic,
        [(None, schemas.encode(_result(_record_id(2)))), (None, schemas.encode(batch[0]))],
    )
    second = run_writeback_until(2)
    assert (second.results, second.already_written) == (2, 1)
    assert [w.record_id for w in salesforce.writes] == [_record_id(0), _record_id(2)]


def _patches(org: SalesforceOrg) -> list[tuple[str, str, int]]:
    """Every modifying REST call the org answered (anything but GET and the token POST)."""
    return [
        call
        for call in list(org.rest_requests)
        if call[0] != "GET" and call[1] != "/services/oauth2/token"
    ]


def _served(settings: Settings, request_ids: set[uuid.UUID]) -> list[InferenceResult]:
    topic = ModelTopics(settings.namespace, MODEL).results
    found: dict[uuid.UUID, InferenceResult] = {}

    def collected() -> bool:
        for value in _read_all(settings, topic):
            result = schemas.decode(value, InferenceResult)
            if result.request_id in request_ids:
                found[result.request_id] = result
        return set(found) == request_ids

    wait_for(polled(collected), 120, f"the worker to serve {len(request_ids)} outsider requests")
    return list(found.values())


def test_requests_published_by_an_outsider_are_served_but_never_written_back(
    settings: Settings, salesforce: SalesforceOrg, tmp_path: Path
) -> None:
    prepare_topics_and_bucket(settings, [MODEL])
    values = _invoice_values(4, seed=31)
    for index in range(2):
        _create(salesforce, index, values[index])
    env = {
        "SALESFORCE_LOGIN_URL": salesforce.login_url,
        "SALESFORCE_CLIENT_ID": salesforce.client_id,
        "SALESFORCE_CLIENT_SECRET": salesforce.client_secret,
        ENV_VARIABLE: SECRET,
    }
    worker = ServiceProcess(settings, ["worker", "--model", MODEL], tmp_path / "worker.log")
    with worker:
        connector = SalesforceConnector(settings, _options(), env)
        thread, errors = _run_in_thread(connector)
        assert connector.writeback is not None
        stats = connector.writeback.stats

        def written(count: int) -> Callable[[], bool]:
            return polled(
                lambda: bool(errors) or len({w.record_id for w in salesforce.writes}) >= count
            )

        try:
            wait_for(written(2), 120, "the connector's own first two records written back")
            before = _patches(salesforce)
            real = min(_requests(settings), key=lambda r: str(r.source))
            assert real.correlation_id is not None
            assert real.source is not None
            victim = _record_id(100)
            outsider_signer = signer("inproc", (b"an outsider's guess at the secret!!",))

            def forged(correlation: str | None, request_id: uuid.UUID | None = None) -> Any:
                features = {**(real.inputs.features or {}), "amount_eur": 1e7}
                return real.model_copy(
                    update={
                        "request_id": request_id or uuid.uuid4(),
                        "correlation_id": correlation,
                        "inputs": real.inputs.model_copy(update={"features": features}),
                    }
                )

            made_up = uuid.uuid4()
            outsiders = [
                # The copied, valid id of a real request on a request of the outsider's.
                forged(real.correlation_id),
                # The old unsigned form, naming another record.
                forged(f"salesforce:inproc:{ENTITY}:{victim}"),
                forged(f"salesforce|inproc|{ENTITY}:{victim}"),
                # The real id with the record swapped.
                forged(real.correlation_id.replace(real.source.entity_id, victim)),
                # The right shape and the request's own id, with a MAC made up.
                forged(f"salesforce|inproc|{ENTITY}:{victim}|{made_up}|{'A' * 43}", made_up),
                # Signed correctly, but with a secret that is not the connector's.
                forged(correlation_id(outsider_signer, ENTITY, victim, made_up), made_up),
            ]
            # A replay of the real request itself (same id, the outsider's inputs): the
            # marker field shows it written already.
            replay = forged(real.correlation_id, real.request_id)
            publish(
                settings,
                ModelTopics(settings.namespace, MODEL).requests,
                (
                    (real.source.entity_id.encode(), schemas.encode(request))
                    for request in [*outsiders, replay]
                ),
            )
            served = _served(settings, {r.request_id for r in outsiders})
            assert {r.status for r in served} == {ResultStatus.OK}, "the worker served them"
            wait_for(
                polled(
                    lambda: (
                        bool(errors)
                        or (stats.forged >= len(outsiders) and stats.already_written >= 1)
                    )
                ),
                60,
                "the connector to refuse every outsider result",
            )
            assert _patches(salesforce) == before, "an outsider's result reached Salesforce"
            # The connector's own requests after them are still written back.
            for index in range(2, 4):
                _create(salesforce, index, values[index])
            wait_for(written(4), 120, "the connector's own later records written back")
        finally:
            connector.stop()
            thread.join(30)
    assert errors == []
    assert stats.forged == len(outsiders)
    assert salesforce.writes_of(victim) == []
    writes = Counter(w.record_id for w in salesforce.writes)
    assert writes == Counter({_record_id(i): 1 for i in range(4)}), "one write per own record"
    own = {str(_expected_request_id(i)) for i in range(4)}
    assert {w.fields["Risk_Request_Id__c"] for w in salesforce.writes} == own


# ---------------------------------------------------------------------------- REST and OAuth


def _rest(org: SalesforceOrg, slept: list[float]) -> SalesforceRest:
    """A REST client whose sleeps are recorded and pass time on a fake clock."""
    import httpx2

    now = [0.0]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    http = httpx2.Client()
    auth = Authenticator(ClientCredentials(org.login_url, org.client_id, org.client_secret), http)
    return SalesforceRest(
        auth,
        http,
        client_id="rest-test",
        retry=RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=0.05),
        limits=OrgLimitBreaker(floor_s=2.0, clock=lambda: now[0]),
        sleep=sleep,
        clock=lambda: now[0],
    )


def test_rest_holds_every_call_after_a_limit_and_reauthenticates_once(
    salesforce: SalesforceOrg,
) -> None:
    _create(salesforce, 0, _invoice_values(1)[0])
    slept: list[float] = []
    rest = _rest(salesforce, slept)
    update = RecordUpdate(ENTITY, _record_id(0), {"Risk_Score__c": 0.1})
    salesforce.fail_next(1, 403, "REQUEST_LIMIT_EXCEEDED")
    with pytest.raises(RateLimitedError):
        rest.update_record(update)
    assert slept == []  # no retry within milliseconds: the org's breaker is open
    assert rest.limits.wait_s() == 2.0
    salesforce.fail_next(1, 503, "SERVER_UNAVAILABLE")
    rest.update_record(update)
    # The next call waited out the breaker's floor, then backed off once after the 503.
    assert len(slept) == 2
    assert slept[0] == 2.0
    assert slept[1] <= 0.05
    salesforce.expire_tokens()
    rest.update_record(update)
    assert salesforce.token_requests == ["client_credentials", "client_credentials"]
    salesforce.fail_next(1, 401, "INVALID_SESSION_ID")
    salesforce.fail_next(1, 401, "INVALID_SESSION_ID")
    with pytest.raises(AuthenticationError, match="again after re-authenticating"):
        rest.update_record(update)
    assert len(salesforce.writes) == 2


def test_the_jwt_bearer_flow_gets_a_session(salesforce: SalesforceOrg) -> None:
    import httpx2
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    salesforce.jwt_public_key = key.public_key()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    flow = JwtBearer(salesforce.login_url, salesforce.client_id, salesforce.jwt_username, pem)
    session = Authenticator(flow, httpx2.Client()).session()
    assert session.instance_url == salesforce.instance_url
    assert session.org_id.startswith("00D")
    wrong_user = JwtBearer(salesforce.login_url, salesforce.client_id, "mallory@example.com", pem)
    with pytest.raises(AuthenticationError, match=r"invalid_grant|approved"):
        Authenticator(wrong_user, httpx2.Client()).session()


def test_the_mapping_file_drives_the_connector(tmp_path: Path) -> None:
    data = yaml.safe_load(MAPPING.read_text())
    assert data["source"]["topic"] == TOPIC
    assert set(data["features"]) == set(FIELD_OF_FEATURE)
