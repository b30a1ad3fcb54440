"""The SAP connector end to end: SAP protocol server -> connector -> Kafka -> a real worker
(Triton) -> results -> connector -> OData writeback, against the real broker.

The SAP side is the protocol server in ``tests/sap_server.py``, not an SAP system.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

import schemas
from connectors.common.checkpoint import CheckpointStore
from connectors.common.correlation import ENV_VARIABLE
from connectors.sap.client import (
    BasicCredentials,
    Credentials,
    OAuthClientCredentials,
    ODataClient,
)
from connectors.sap.exceptions import EntityNotFound, ODataError, PreconditionFailed
from connectors.sap.intake import EVENTS_STREAM
from connectors.sap.odata import EntitySource
from connectors.sap.writeback import WritebackCall, correlation_id, signer
from devkit.modeling.invoices import generate
from pipeline.kafka.admin import describe_topics, end_offsets
from pipeline.settings import Settings
from pipeline.topics import ModelTopics
from schemas.models import DeadLetter, InferenceRequest, InferenceResult
from tests.integration.traffic import events_on_topic, publish
from tests.integration.waiting import wait_for
from tests.sap_server import (
    V2_ENTITY_SET,
    V2_SERVICE,
    V4_ENTITY_SET,
    V4_SERVICE,
    PushReport,
    SapProtocolServer,
    event_request_id,
    free_port,
    invoices_from_features,
    push_events,
    supplier_invoice_event,
)
from workers.inference.runner import prepare_topics_and_bucket
from workers.processes import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
MAPPING = REPO_ROOT / "connectors" / "sap" / "mappings" / "supplier_invoice.yaml"
MODEL = "invoice_risk"
SYSTEM = "S4H"
CONNECTOR = "sap-test"
SECRET = "sap-connector-test-secret-0123456789abcdef"


@pytest.fixture
def sap(monkeypatch: pytest.MonkeyPatch) -> Iterator[SapProtocolServer]:
    with SapProtocolServer(page_size=40) as server:
        # The connector reads its credentials from the environment, as in production.
        monkeypatch.setenv("SAP_USERNAME", server.username)
        monkeypatch.setenv("SAP_PASSWORD", server.password)
        yield server


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[ServiceProcess]:
    prepare_topics_and_bucket(settings, [MODEL])
    with ServiceProcess(settings, ["worker", "--model", MODEL], tmp_path / "worker.log") as run:
        yield run


class Connector:
    """``sluiceway connect-sap`` as its own process (so it can be killed)."""

    def __init__(
        self, settings: Settings, sap: SapProtocolServer, log: Path, mapping: Path, *args: str
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/events"
        listen = "off" if "--poll-interval" in args else f"127.0.0.1:{self.port}"
        self.process = ServiceProcess(
            settings,
            [
                "connect-sap",
                "--mapping",
                str(mapping),
                "--base-url",
                sap.base_url,
                "--name",
                CONNECTOR,
                "--listen",
                listen,
                # Loopback only: the webhook's security has its own tests (test_sap_webhook.py).
                *(() if listen == "off" else ("--webhook-auth", "none")),
                *args,
            ],
            log,
            # The connector signs its requests with it (and verifies results with it).
            extra_environment={ENV_VARIABLE: SECRET},
        )

    def start(self) -> Connector:
        self.process.start()
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        def answers() -> bool:
            assert not self.process.exited(), self.process.tail()
            try:
                return httpx2.get(f"http://127.0.0.1:{self.port}/healthz").status_code == 200
            except httpx2.TransportError:
                return False

        wait_for(answers, timeout_s, f"the connector's receiver\n{self.process.tail()}")

    def counts(self) -> dict[str, int]:
        """The running connector's counters (``GET /healthz``)."""
        answer: dict[str, int] = httpx2.get(f"http://127.0.0.1:{self.port}/healthz").json()
        return answer


def _requests_published(settings: Settings) -> list[InferenceRequest]:
    return events_on_topic(
        settings, ModelTopics(settings.namespace, MODEL).requests, InferenceRequest
    )


def _dead_letters(settings: Settings, count: int, timeout_s: float = 30.0) -> list[DeadLetter]:
    consumer = Consumer({**settings.kafka.client_config(), "group.id": "sap-test-dlq"})
    consumer.assign(
        [TopicPartition(ModelTopics(settings.namespace, MODEL).dlq, 0, OFFSET_BEGINNING)]
    )
    letters: list[DeadLetter] = []

    def collected() -> bool:
        message = consumer.poll(0.5)
        if message is not None and message.error() is None:
            letters.append(schemas.decode(message.value() or b"", DeadLetter))
        return len(letters) >= count

    try:
        wait_for(collected, timeout_s, f"{count} dead letters")
    finally:
        consumer.close()
    return letters


def _every(interval_s: float, condition: Callable[[], bool]) -> Callable[[], bool]:
    """``condition``, checked at most every ``interval_s`` (no busy loop on a shared CPU)."""
    pause = threading.Event()
    return lambda: condition() or pause.wait(interval_s)


def _all_written(sap: SapProtocolServer, keys: list[tuple[str, str]], timeout_s: float) -> None:
    wait_for(
        _every(0.2, lambda: len(sap.writes_by_key()) >= len(keys)),
        timeout_s,
        f"{len(keys)} invoices written back",
    )


def test_a_thousand_events_are_scored_and_written_back_exactly_once(
    settings: Settings, sap: SapProtocolServer, worker: ServiceProcess, tmp_path: Path
) -> None:
    keys = invoices_from_features(sap, generate(1000, seed=7).x)
    events = [supplier_invoice_event(key, event_id=f"evt-{i:04d}") for i, key in enumerate(keys)]
    # Busy answers and an expired CSRF token on the way back must not lose or repeat a write.
    sap.fail_next(429, 3, retry_after="1", methods={"MERGE"})
    # The token expires in the middle of the writeback, whatever the machine's speed: at the
    # moment the server accepts the 300th write, so the writes after it need a fresh token.
    expire_at = 300
    sap.expire_csrf_tokens_after_writes(expire_at)
    connector = Connector(settings, sap, tmp_path / "connector.log", MAPPING).start()
    try:
        connector.wait_ready()
        first = push_events(connector.url, events[:500], mode="structured")
        second = push_events(connector.url, events[500:999], mode="binary")
        last = push_events(connector.url, events[999:], mode="structured")
        # A broker redelivering events already accepted creates no second request.
        again = push_events(connector.url, events[:50], mode="structured")
        _all_written(sap, keys, timeout_s=240)
        store = CheckpointStore(settings, CONNECTOR)
        wait_for(
            lambda: store.load().get(EVENTS_STREAM) == "evt-0999",
            30,
            "the events checkpoint to reach the last event",
        )
    finally:
        connector.process.stop()
    assert isinstance(first, PushReport)
    assert first.delivered + second.delivered + last.delivered == 1000
    assert again.delivered == 50

    requests = _requests_published(settings)
    assert len(requests) == 1000
    expected_ids = {event_request_id(SYSTEM, event["id"]) for event in events}
    assert {r.request_id for r in requests} == expected_ids
    assert all(r.source is not None and r.source.system == SYSTEM for r in requests)
    assert {r.source.entity_id for r in requests if r.source} == {f"1010/{n}/{y}" for n, y in keys}

    writes = sap.writes_by_key()
    assert set(writes) == set(keys)
    assert all(len(w) == 1 for w in writes.values()), "every invoice written exactly once"
    by_key = {(r.correlation_id or "").split("|")[2]: r for r in requests}
    for key, (write,) in writes.items():
        assert write.method == "MERGE"
        predicate = f"(SupplierInvoice='{key[0]}',FiscalYear='{key[1]}')"
        assert write.body["YY1_RiskRequestId"] == str(by_key[predicate].request_id)
        assert 0.0 < float(write.body["YY1_RiskScore"]) < 1.0
    assert sap.requests_by_status.get(429, 0) == 3
    # The token expired mid-writeback; the next write was refused (403 + x-csrf-token:
    # Required), the connector fetched a token again, and the refused write then succeeded.
    assert sap.csrf_expired_at_write == expire_at
    rejections = sap.csrf_rejections
    assert rejections, "no write was refused after the token expired"
    assert sap.requests_by_status.get(403, 0) == len(rejections)
    assert all(r.writes_before >= expire_at for r in rejections), "refused before the expiry"
    assert sap.csrf_fetches_at_expiry is not None
    assert sap.csrf_fetches > sap.csrf_fetches_at_expiry, "the token was not fetched again"
    position = {w.key: index for index, w in enumerate(sap.writes)}
    for rejection in rejections:
        assert rejection.method == "MERGE"
        assert rejection.key is not None
        assert position[rejection.key] >= rejection.writes_before, "the refused write was lost"
    assert "dead-lettered" not in connector.process.tail(200)


def test_a_killed_connector_restarts_without_duplicates_or_gaps(
    settings: Settings, sap: SapProtocolServer, worker: ServiceProcess, tmp_path: Path
) -> None:
    keys = invoices_from_features(sap, generate(400, seed=11).x)
    events = [supplier_invoice_event(key, event_id=f"kill-{i:04d}") for i, key in enumerate(keys)]
    # The kill must fall in the middle of the run, however fast the machine: after 120 reads
    # the server holds every read, so no event can be accepted until the connector is killed.
    sap.hold_reads_after(120)
    connector = Connector(settings, sap, tmp_path / "connector.log", MAPPING).start()
    pushed: Future[PushReport] = Future()

    def push() -> None:
        try:
            pushed.set_result(push_events(connector.url, events, concurrency=4, timeout_s=240))
        except BaseException as error:  # handed to the test thread
            pushed.set_exception(error)

    try:
        connector.wait_ready()
        threading.Thread(target=push, daemon=True).start()
        wait_for(_every(0.05, lambda: sap.held_reads >= 1), 120, "120 reads, the next held")
        delivered_before_kill = pushed.done()
        connector.process.stop(signal.SIGKILL)
        sap.release_reads()
        connector.process.start()
        report = pushed.result(timeout=300)
        _all_written(sap, keys, timeout_s=240)
    finally:
        connector.process.stop()
    assert not delivered_before_kill
    assert sap.reads >= 120
    assert report.delivered == 400
    assert report.attempts > report.delivered, "the kill interrupted deliveries"
    requests = _requests_published(settings)
    ids = [r.request_id for r in requests]
    assert len(ids) == len(set(ids)) == 400, "no event twice, none missed"
    assert set(ids) == {event_request_id(SYSTEM, e["id"]) for e in events}
    writes = sap.writes_by_key()
    assert set(writes) == set(keys)
    assert all(len(w) == 1 for w in writes.values())


def _results_served(settings: Settings, request_ids: set[uuid.UUID]) -> list[InferenceResult]:
    """The results of ``request_ids`` on the results topic (read from its beginning)."""
    topic = ModelTopics(settings.namespace, MODEL).results
    consumer = Consumer(
        {**settings.kafka.client_config(), "group.id": f"sap-test-{uuid.uuid4().hex[:6]}"}
    )
    partitions = end_offsets(settings.kafka, topic)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    found: dict[uuid.UUID, InferenceResult] = {}

    def collected() -> bool:
        for message in consumer.consume(500, 0.5):
            if message.error() is None:
                result = schemas.decode(message.value() or b"", InferenceResult)
                if result.request_id in request_ids:
                    found[result.request_id] = result
        return set(found) == request_ids

    try:
        wait_for(collected, 120, f"the worker to serve {len(request_ids)} outsider requests")
    finally:
        consumer.close()
    return list(found.values())


def test_requests_published_by_an_outsider_are_served_but_never_written_back(
    settings: Settings, sap: SapProtocolServer, worker: ServiceProcess, tmp_path: Path
) -> None:
    rows = generate(6, seed=29).x
    keys = invoices_from_features(sap, rows[:4])
    victims = invoices_from_features(sap, rows[4:], first_number=5105700000)
    events = [supplier_invoice_event(key, event_id=f"own-{i}") for i, key in enumerate(keys)]
    connector = Connector(settings, sap, tmp_path / "connector.log", MAPPING).start()
    topic = ModelTopics(settings.namespace, MODEL).requests
    try:
        connector.wait_ready()
        push_events(connector.url, events[:2])
        _all_written(sap, keys[:2], timeout_s=120)
        (real, _) = sorted(
            _requests_published(settings),
            key=lambda r: str(r.source),
        )
        assert real.correlation_id is not None
        real_predicate = real.correlation_id.split("|")[2]
        victim = f"(SupplierInvoice='{victims[0][0]}',FiscalYear='{victims[0][1]}')"
        other = f"(SupplierInvoice='{victims[1][0]}',FiscalYear='{victims[1][1]}')"
        outsider_signer = signer(CONNECTOR, (b"an outsider's guess at the secret!!",))

        def forged(correlation: str | None = None, request_id: uuid.UUID | None = None) -> Any:
            request_id = request_id or uuid.uuid4()
            return real.model_copy(
                update={
                    "request_id": request_id,
                    "correlation_id": correlation,
                    # Inputs of the outsider's choosing: a score they picked.
                    "inputs": real.inputs.model_copy(
                        update={"features": {**(real.inputs.features or {}), "amount_eur": 1e7}}
                    ),
                }
            )

        copied_id = uuid.uuid4()
        mac_shaped_id = uuid.uuid4()
        outsiders = [
            # The copied, valid id of a real request on a request of the outsider's.
            forged(real.correlation_id, copied_id),
            # The old unsigned form, naming another invoice.
            forged(f"sap|{CONNECTOR}|{victim}"),
            # The real id with the invoice swapped (its MAC then covers another subject).
            forged(real.correlation_id.replace(real_predicate, victim)),
            # The right shape and the request's own id, with a MAC made up.
            forged(f"sap|{CONNECTOR}|{other}|{mac_shaped_id}|{'A' * 43}", mac_shaped_id),
            # Signed correctly, but with a secret that is not the connector's.
            forged(correlation_id(outsider_signer, victim, mac_shaped_id), mac_shaped_id),
        ]
        # A replay of the real request itself (same id, the outsider's inputs): it may only
        # be the already written result, never a second write.
        replay = forged(real.correlation_id, real.request_id)
        publish(
            settings,
            topic,
            (
                (str(request.request_id).encode(), schemas.encode(request))
                for request in [*outsiders, replay]
            ),
        )
        # The connector's own requests after them are still written back.
        push_events(connector.url, events[2:])
        _all_written(sap, keys, timeout_s=120)
        served = _results_served(settings, {r.request_id for r in outsiders})
        assert {r.status.value for r in served} == {"ok"}, "the worker served them all"
        wait_for(
            _every(0.2, lambda: connector.counts().get("forged", 0) >= len(outsiders)),
            60,
            "the connector to refuse every outsider result",
        )
        counts = connector.counts()
    finally:
        connector.process.stop()
    assert counts["forged"] == len(outsiders)
    assert counts["written"] == len(keys)
    assert sap.modifying_calls(victims[0]) == []
    assert sap.modifying_calls(victims[1]) == []
    assert sorted(call.key or ("", "") for call in sap.modifying_calls()) == sorted(
        write.key for write in sap.writes
    ), "no modifying call but the connector's own writes"
    writes = sap.writes_by_key()
    assert set(writes) == set(keys)
    assert all(len(w) == 1 for w in writes.values()), "a forged result was written"
    own = {str(event_request_id(SYSTEM, event["id"])) for event in events}
    assert {w.body["YY1_RiskRequestId"] for (w,) in writes.values()} <= own
    outsider_ids = {str(r.request_id) for r in outsiders}
    assert not {w.body["YY1_RiskRequestId"] for (w,) in writes.values()} & outsider_ids
    log = (tmp_path / "connector.log").read_text()
    refusals = [line for line in log.splitlines() if "writeback refused" in line]
    assert len(refusals) == len(outsiders)
    assert all("1e7" not in line and "10000000" not in line for line in refusals)


def test_polling_reads_v4_pages_checkpoints_and_ignores_its_own_writebacks(
    settings: Settings, sap: SapProtocolServer, worker: ServiceProcess, tmp_path: Path
) -> None:
    keys = invoices_from_features(sap, generate(150, seed=3).x)
    mapping: dict[str, Any] = yaml.safe_load(MAPPING.read_text())
    mapping["source"].update(
        odata_version=4, service=V4_SERVICE, entity_set=V4_ENTITY_SET, page_size=100
    )
    v4_mapping = tmp_path / "supplier_invoice_v4.yaml"
    v4_mapping.write_text(yaml.safe_dump(mapping, sort_keys=False))
    connector = Connector(
        settings, sap, tmp_path / "connector.log", v4_mapping, "--poll-interval", "0.5"
    ).start()
    store = CheckpointStore(settings, CONNECTOR)
    try:
        _all_written(sap, keys, timeout_s=240)
        newest = max(sap.invoice(key)["LastChangeDateTime"] for key in keys)

        def caught_up() -> bool:
            position = store.load().get(f"delta:{V4_ENTITY_SET}")
            return position is not None and position.startswith(
                newest.strftime("%Y-%m-%dT%H:%M:%S")
            )

        wait_for(caught_up, 60, "the delta checkpoint to reach the newest change")
    finally:
        connector.process.stop()
    writes = sap.writes_by_key()
    assert set(writes) == set(keys)
    assert all(len(w) == 1 and w[0].method == "PATCH" for w in writes.values())
    requests = _requests_published(settings)
    assert len(requests) == 150, "its own writebacks are not scored again"


def test_polling_follows_next_links_through_changes_of_the_same_instant(
    settings: Settings, sap: SapProtocolServer, tmp_path: Path
) -> None:
    prepare_topics_and_bucket(settings, [MODEL])
    instant = datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)
    keys = invoices_from_features(sap, generate(100, seed=19).x, changed_at=instant)
    connector = Connector(
        settings,
        sap,
        tmp_path / "connector.log",
        MAPPING,
        "--poll-interval",
        "0.5",
        "--no-writeback",
    ).start()
    store = CheckpointStore(settings, CONNECTOR)
    try:
        wait_for(
            _every(
                0.5,
                lambda: (
                    len(
                        events_on_topic(
                            settings,
                            ModelTopics(settings.namespace, MODEL).requests,
                            InferenceRequest,
                        )
                    )
                    >= 100
                ),
            ),
            120,
            "100 requests from one instant",
        )
        assert store.load() == {f"delta:{V2_ENTITY_SET}": "2024-05-01T10:00:00.123Z"}
    finally:
        connector.process.stop()
    requests = _requests_published(settings)
    assert len(requests) == 100
    assert {r.source.entity_id for r in requests if r.source} == {f"1010/{n}/{y}" for n, y in keys}
    # 40 per page: the run of equal change times is read through the server's __next links.
    followed = [q["$skiptoken"] for q in sap.collection_queries if "$skiptoken" in q]
    assert {"40", "80"} <= set(followed)


def test_unmappable_and_invalid_events_are_dead_lettered_with_their_payload(
    settings: Settings, sap: SapProtocolServer, tmp_path: Path
) -> None:
    prepare_topics_and_bucket(settings, [MODEL])
    (good,) = invoices_from_features(sap, generate(1, seed=5).x)
    broken = sap.add_invoice(SupplierInvoice="5199999999", InvoiceGrossAmount=None)
    connector = Connector(
        settings, sap, tmp_path / "connector.log", MAPPING, "--no-writeback"
    ).start()
    try:
        connector.wait_ready()
        push_events(connector.url, [supplier_invoice_event(broken, event_id="bad-amount")])
        push_events(
            connector.url, [supplier_invoice_event(("404", "2024"), event_id="missing-entity")]
        )
        invalid = httpx2.post(
            connector.url,
            content=b'{"specversion": "1.0", "type": "x"}',
            headers={"Content-Type": "application/cloudevents+json"},
        )
        push_events(connector.url, [supplier_invoice_event(good, event_id="fine")])
        letters = _dead_letters(settings, 3)
    finally:
        connector.process.stop()
    assert invalid.status_code == 200
    reasons = {letter.reason_code: letter for letter in letters}
    assert set(reasons) == {"missing_field", "entity_not_found", "invalid_cloudevent"}
    missing = reasons["missing_field"]
    assert "InvoiceGrossAmount" in missing.reason_message
    assert json.loads(missing.original_value or b"")["id"] == "bad-amount"
    assert missing.request_id == str(event_request_id(SYSTEM, "bad-amount"))
    assert reasons["invalid_cloudevent"].original_value == b'{"specversion": "1.0", "type": "x"}'
    assert all(letter.model == MODEL and letter.worker_id == CONNECTOR for letter in letters)
    (request,) = _requests_published(settings)
    assert request.request_id == event_request_id(SYSTEM, "fine")


# ---------------------------------------------------------------------- the OData client alone

V2_SOURCE = EntitySource(
    service=V2_SERVICE,
    entity_set=V2_ENTITY_SET,
    keys={"SupplierInvoice": "string", "FiscalYear": "string"},
)


def _client(sap: SapProtocolServer, credentials: Credentials, **kwargs: Any) -> ODataClient:
    return ODataClient(sap.base_url, V2_SOURCE, credentials, **kwargs)


def _basic(sap: SapProtocolServer, password: str | None = None) -> BasicCredentials:
    return BasicCredentials(sap.username, SecretStr(password or sap.password))


PREDICATE = "(SupplierInvoice='5105600001',FiscalYear='2024')"


def test_an_expired_csrf_token_is_fetched_again_once(sap: SapProtocolServer) -> None:
    key = sap.add_invoice(SupplierInvoice="5105600001")
    merge = WritebackCall(
        "MERGE", f"{V2_SOURCE.collection_path}{PREDICATE}", {"YY1_RiskScore": "0.5"}, ""
    )

    async def run() -> None:
        client = _client(sap, _basic(sap))
        try:
            first = await client.read_entity(PREDICATE)
            await client.write(merge, first.etag)
            sap.expire_csrf_tokens()
            second = await client.read_entity(PREDICATE)
            await client.write(merge, second.etag)
            with pytest.raises(PreconditionFailed):
                await client.write(merge, first.etag)  # a stale ETag
        finally:
            await client.close()

    asyncio.run(run())
    assert [w.method for w in sap.writes] == ["MERGE", "MERGE"]
    assert sap.csrf_fetches == 2
    assert sap.requests_by_status[403] == 1
    assert sap.requests_by_status[412] == 1
    assert sap.invoice(key)["YY1_RiskScore"] == Decimal("0.5")


def test_busy_answers_are_retried_no_sooner_than_retry_after(sap: SapProtocolServer) -> None:
    sap.add_invoice(SupplierInvoice="5105600001")
    sap.fail_next(503, 2, retry_after="1", methods={"GET"})
    waits: list[float] = []

    async def recorded_sleep(seconds: float) -> None:
        waits.append(seconds)

    async def run() -> None:
        client = _client(sap, _basic(sap), sleep=recorded_sleep)
        try:
            await client.read_entity(PREDICATE)
        finally:
            await client.close()

    asyncio.run(run())
    assert waits == [1.0, 1.0]
    assert sap.requests_by_status[503] == 2


def test_wrong_credentials_get_401_and_oauth_gets_a_token(sap: SapProtocolServer) -> None:
    sap.add_invoice(SupplierInvoice="5105600001")
    ((client_id, secret),) = sap.oauth_clients.items()
    oauth = OAuthClientCredentials(f"{sap.base_url}/oauth/token", client_id, SecretStr(secret))

    async def run() -> tuple[ODataError, dict[str, Any]]:
        wrong = _client(sap, _basic(sap, "wrong"))
        right = _client(sap, oauth)
        try:
            with pytest.raises(ODataError) as refused:
                await wrong.read_entity(PREDICATE)
            record = await right.read_entity(PREDICATE)
            return refused.value, record.properties
        finally:
            await wrong.close()
            await right.close()

    refused, properties = asyncio.run(run())
    assert refused.status == 401
    assert "wrong" not in str(refused)
    assert properties["SupplierInvoice"] == "5105600001"


def test_an_unknown_entity_is_not_found(sap: SapProtocolServer) -> None:
    async def run() -> None:
        client = _client(sap, _basic(sap))
        try:
            with pytest.raises(EntityNotFound):
                await client.read_entity(PREDICATE)
        finally:
            await client.close()

    asyncio.run(run())


def test_replayed_results_are_not_written_twice(
    settings: Settings, sap: SapProtocolServer, worker: ServiceProcess, tmp_path: Path
) -> None:
    keys = invoices_from_features(sap, generate(20, seed=13).x)
    events = [supplier_invoice_event(key, event_id=f"replay-{i}") for i, key in enumerate(keys)]
    connector = Connector(settings, sap, tmp_path / "connector.log", MAPPING).start()
    try:
        connector.wait_ready()
        push_events(connector.url, events)
        _all_written(sap, keys, timeout_s=120)
    finally:
        connector.process.stop()
    # As if the connector had died after its writes but before committing: the group forgets
    # its offsets and the restarted connector reads every result again.
    admin = AdminClient(settings.kafka.client_config())
    group = f"{settings.namespace}.connector.{CONNECTOR}.writeback"

    def group_deleted() -> bool:
        # A static member stays in its group until its session times out (10 s).
        (future,) = admin.delete_consumer_groups([group], request_timeout=15).values()
        try:
            future.result(timeout=15)
        except KafkaException as error:
            if error.args[0].code() != KafkaError.NON_EMPTY_GROUP:
                raise
            return False
        return True

    wait_for(_every(1.0, group_deleted), 60, "the stopped connector's group to empty")
    again = Connector(settings, sap, tmp_path / "again.log", MAPPING).start()
    try:
        again.wait_ready()
        wait_for(
            _every(0.2, lambda: again.counts().get("already_written") == 20),
            60,
            "the restarted connector to find all 20 results written",
        )
    finally:
        again.process.stop()
    writes = sap.writes_by_key()
    assert len(writes) == 20
    assert all(len(w) == 1 for w in writes.values())


def test_a_function_import_writes_back_where_the_entity_takes_no_update(
    settings: Settings, sap: SapProtocolServer, worker: ServiceProcess, tmp_path: Path
) -> None:
    keys = invoices_from_features(sap, generate(5, seed=17).x)
    mapping: dict[str, Any] = yaml.safe_load(MAPPING.read_text())
    mapping["writeback"] = {"method": "action", "action": "Release", "output": "score"}
    action_mapping = tmp_path / "release.yaml"
    action_mapping.write_text(yaml.safe_dump(mapping, sort_keys=False))
    connector = Connector(settings, sap, tmp_path / "connector.log", action_mapping).start()
    try:
        connector.wait_ready()
        push_events(connector.url, [supplier_invoice_event(key) for key in keys])
        _all_written(sap, keys, timeout_s=120)
    finally:
        connector.process.stop()
    assert all(sap.actions(key) == ["Release"] for key in keys)
    assert all(len(w) == 1 and w[0].method == "POST Release" for w in sap.writes_by_key().values())


def test_checkpoints_keep_each_connectors_latest_position(settings: Settings) -> None:
    sap_store = CheckpointStore(settings, "sap-a")
    other = CheckpointStore(settings, "salesforce-b")
    try:
        assert sap_store.load() == {}
        sap_store.save("events", "evt-1")
        sap_store.save("events", "evt-2")
        sap_store.save("delta:A_SupplierInvoice", "2024-05-01T10:00:00Z")
        other.save("replay", bytes([0, 1, 2]))
        sap_store.clear("delta:A_SupplierInvoice")
        assert sap_store.load() == {"events": "evt-2"}
        assert other.load() == {"replay": "AAEC"}
        # A restarted connector (a new store) reads the same positions back.
        assert CheckpointStore(settings, "sap-a").load() == {"events": "evt-2"}
        (described,) = [
            t
            for t in describe_topics(settings.kafka, settings.namespace)
            if t.name == sap_store.topic
        ]
        assert (described.partitions, described.cleanup_policy) == (1, "compact")
    finally:
        sap_store.close()
        other.close()
