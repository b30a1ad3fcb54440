"""A connector writes one dead letter per source event: the letter names the event in a
header, a redelivery of an event already dead-lettered is a duplicate, and a restarted
connector learns the letters written before it from those headers alone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from connectors.common.correlation import CorrelationSigner
from connectors.common.dead_letters import (
    SOURCE_EVENT_HEADER,
    encode_letter,
    letter_source_event,
    source_event_key,
    unmappable_letter,
)
from connectors.common.dedupe import RecentKeys
from connectors.common.mapping import load_mapping, parse_mapping
from connectors.salesforce import cdc
from connectors.salesforce.config import SourceConfig, input_fields
from connectors.salesforce.connector import IngestLoop, Route, letter_key
from connectors.salesforce.pubsub import EventSchema, FetchBatch, ReceivedEvent
from connectors.sap.client import BasicCredentials, ODataClient
from connectors.sap.cloudevents import CloudEvent
from connectors.sap.connector import SapConnector
from connectors.sap.core import event_letter_key, malformed_letter_key, remember_letters
from connectors.sap.odata import EntityRecord, EntitySource, Page
from pipeline.settings import ModelSettings, Settings
from schemas.errors import UnservableRecord
from tests.unit.fakes import FakeClock

REPO_ROOT = Path(__file__).resolve().parents[2]
SAP_MAPPING = REPO_ROOT / "connectors" / "sap" / "mappings" / "supplier_invoice.yaml"


class FakeLetterProducer:
    """Takes letters as ``send_unmappable`` writes them; acknowledges each on ``flush``
    unless told to fail."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, list[tuple[str, bytes]]]] = []
        self.failing = False
        self._pending: list[Callable[[Any, Any], None]] = []

    def produce(
        self,
        topic: str,
        value: bytes,
        key: Any = None,
        headers: list[tuple[str, bytes]] | None = None,
        on_delivery: Callable[[Any, Any], None] | None = None,
    ) -> None:
        if not self.failing:
            self.sent.append((topic, value, list(headers or [])))
        if on_delivery is not None:
            self._pending.append(on_delivery)

    def flush(self, timeout: float = 0.0) -> int:
        pending, self._pending = self._pending, []
        if self.failing:
            return len(pending)  # never acknowledged
        for callback in pending:
            callback(None, None)
        return 0

    def source_events(self) -> list[str | None]:
        return [letter_source_event(headers) for _, _, headers in self.sent]


# ---------------------------------------------------------------------------- the header


def test_a_letter_carries_its_source_event_key_and_nothing_of_the_record() -> None:
    sealed = unmappable_letter(
        model="invoice_risk",
        source_payload=b'{"Name": "Ada Lovelace"}',
        reason_code="missing_field",
        message="no amount",
        source_system="S4H",
        source_event="event:0b5e",
    )
    _, headers = encode_letter(sealed)
    assert [value for name, value in headers if name == SOURCE_EVENT_HEADER] == [b"event:0b5e"]
    assert letter_source_event(headers) == "event:0b5e"
    unnamed = unmappable_letter(
        model="invoice_risk", source_payload=b"{}", reason_code="x", message="x", source_system="S"
    )
    assert letter_source_event(encode_letter(unnamed)[1]) is None


@pytest.mark.parametrize(
    "raw",
    ["x" * 257, "letter:évènement:001", "letter:a\nb:-", "letter:\ud800:-"],
)
def test_a_long_or_odd_key_becomes_its_digest_and_stays_one(raw: str) -> None:
    key = source_event_key(raw)
    assert key.startswith("digest:")
    assert len(key) == len("digest:") + 32
    assert source_event_key(key) == key
    sealed = unmappable_letter(
        model="m", source_payload=b"{}", reason_code="x", message="x", source_system="S",
        source_event=raw,
    )  # fmt: skip
    assert letter_source_event(encode_letter(sealed)[1]) == key


@pytest.mark.parametrize(
    "headers",
    [
        None,
        [],
        [("sluiceway-reason", b"missing_field")],
        [(SOURCE_EVENT_HEADER, b"event:a"), (SOURCE_EVENT_HEADER, b"event:b")],
        [(SOURCE_EVENT_HEADER, b"\xff\xfe")],
        [(SOURCE_EVENT_HEADER, b"")],
        [(SOURCE_EVENT_HEADER, None)],
        [(SOURCE_EVENT_HEADER, b"y" * 300)],
        [(SOURCE_EVENT_HEADER, b"event:a\nb")],
    ],
)
def test_a_header_no_connector_wrote_names_no_event(headers: Any) -> None:
    assert letter_source_event(headers) is None


# ---------------------------------------------------------------------------- Salesforce


SF_MAPPING = parse_mapping(
    {
        "model": "account_risk",
        "source_system": "salesforce",
        "entity_type": "Account",
        "entity_id": "{Id}",
        "features": {"revenue": {"path": "AnnualRevenue", "type": "float"}},
    }
)
SCHEMA = EventSchema("schema-1", {}, None)


class _Checkpoints:
    def __init__(self) -> None:
        self.saved: list[tuple[str, bytes]] = []

    def load(self) -> dict[str, str]:
        return {}

    def save(self, stream: str, position: bytes) -> None:
        self.saved.append((stream, position))


class _Letters:
    """The dead-letter sink: records each letter, or fails (no ack) while ``failing``."""

    def __init__(self) -> None:
        self.written: list[tuple[str, str | None, str | None]] = []
        self.failing = False

    def __call__(
        self,
        model: str,
        payload: bytes,
        why: UnservableRecord,
        record_id: str | None,
        source_event: str | None,
    ) -> None:
        if self.failing:
            raise OSError("the DLQ did not acknowledge")
        self.written.append((model, record_id, source_event))


def _ingest(letters: _Letters, memory: RecentKeys) -> IngestLoop:
    route = Route(
        "Account",
        SF_MAPPING,
        SourceConfig(topic="/data/ChangeEvents"),
        input_fields(SF_MAPPING),
        cdc.OwnChanges(client_id="t", integration_users=frozenset(), writeback_fields=frozenset()),
    )
    unused: Any = None  # no batch here reaches Pub/Sub, REST or the requests topic
    return IngestLoop(
        name="t",
        signer=CorrelationSigner("sf", "t", [b"secret-0123456789abcdef"]),
        routes=[route],
        channel="/data/ChangeEvents",
        pubsub=unused,
        rest=unused,
        publisher=unused,
        invalidations=unused,
        checkpoints=_Checkpoints(),  # type: ignore[arg-type]
        dead_letter=letters,
        memory=memory,
    )


def _undecodable(replay: int, event_id: str) -> ReceivedEvent:
    return ReceivedEvent(
        bytes([replay]), event_id, SCHEMA, None, raw=b"\x00garbage", error="bad avro"
    )


def _not_a_change_event(replay: int, event_id: str) -> ReceivedEvent:
    return ReceivedEvent(bytes([replay]), event_id, SCHEMA, {"Name": "Ada"}, raw=b"{}")


def _batch(*events: ReceivedEvent) -> FetchBatch:
    return FetchBatch(list(events), events[-1].replay_id, 0)


def _memory(clock: FakeClock) -> RecentKeys:
    return RecentKeys(max_keys=100, max_age_s=3600.0, clock=clock)


def test_a_redelivered_unmappable_event_is_dead_lettered_once() -> None:
    letters = _Letters()
    loop = _ingest(letters, _memory(FakeClock()))
    first, second = _undecodable(1, "uuid-1"), _not_a_change_event(2, "uuid-2")
    loop.handle(_batch(first, second, _undecodable(3, "uuid-1")))  # redelivered in the batch
    loop.handle(_batch(_undecodable(4, "uuid-1"), _not_a_change_event(5, "uuid-2")))
    assert letters.written == [
        ("account_risk", None, "letter:uuid-1:-"),
        ("account_risk", None, "letter:uuid-2:-"),
    ]
    assert loop.stats.dead_lettered == 2
    assert loop.stats.duplicates == 3
    assert loop.stats.outcomes == {
        "request": 0,
        "invalidation": 0,
        "duplicate": 3,
        "skipped": 0,
        "dead_letter": 2,
    }


def test_a_letter_the_dlq_did_not_acknowledge_is_written_on_redelivery() -> None:
    letters = _Letters()
    loop = _ingest(letters, _memory(FakeClock()))
    letters.failing = True
    with pytest.raises(OSError, match="acknowledge"):
        loop.handle(_batch(_undecodable(1, "uuid-1")))
    letters.failing = False
    loop.handle(_batch(_undecodable(1, "uuid-1")))
    assert letters.written == [("account_risk", None, "letter:uuid-1:-")]
    assert loop.stats.duplicates == 0


def test_after_a_restart_a_letter_read_back_from_the_dlq_is_a_duplicate() -> None:
    """The memory as ``seed_memory`` leaves it: the keys of the DLQ's headers."""
    clock = FakeClock()
    memory = _memory(clock)
    memory.add(letter_key(_undecodable(1, "uuid-1"), None))
    letters = _Letters()
    loop = _ingest(letters, memory)
    loop.handle(_batch(_undecodable(1, "uuid-1"), _undecodable(2, "uuid-9")))
    assert letters.written == [("account_risk", None, "letter:uuid-9:-")]
    assert loop.stats.outcomes["duplicate"] == 1
    assert loop.stats.outcomes["dead_letter"] == 1
    clock.advance(3600.0)  # past the window: forgotten, written again (never lost)
    loop.handle(_batch(_undecodable(3, "uuid-1")))
    assert [key for _, _, key in letters.written] == ["letter:uuid-9:-", "letter:uuid-1:-"]


def test_an_event_without_an_id_is_named_by_its_replay_id() -> None:
    letters = _Letters()
    loop = _ingest(letters, _memory(FakeClock()))
    loop.handle(_batch(_undecodable(1, ""), _undecodable(2, ""), _undecodable(2, "")))
    assert [key for _, _, key in letters.written] == ["letter:replay-01:-", "letter:replay-02:-"]
    assert loop.stats.duplicates == 1


def test_a_hostile_event_id_is_kept_as_a_bounded_digest() -> None:
    letters = _Letters()
    loop = _ingest(letters, _memory(FakeClock()))
    hostile = "é" * 100_000
    loop.handle(_batch(_undecodable(1, hostile), _undecodable(2, hostile)))
    [(_, _, key)] = letters.written
    assert key == source_event_key(f"letter:{hostile}:-")
    assert len(key) == len("digest:") + 32
    assert loop.stats.duplicates == 1


# ---------------------------------------------------------------------------- SAP


def _sap(producer: FakeLetterProducer, clock: FakeClock) -> SapConnector:
    mapping = load_mapping(SAP_MAPPING)
    settings = Settings(models={"invoice_risk": ModelSettings(feature_order=("amount_eur",))})
    odata = ODataClient(
        "http://127.0.0.1:9",  # never reached: every event here fails before a read
        EntitySource.from_mapping(mapping.source),
        BasicCredentials("u", SecretStr("p")),
    )
    return SapConnector(
        settings,
        mapping,
        odata,
        secrets=(b"sap-unit-secret-0123456789",),
        name="sap-unit",
        monotonic=clock,
        letter_producer=producer,  # type: ignore[arg-type]
    )


def _keyless_event(event_id: str, source: str = "/default/sap.s4/S4H") -> CloudEvent:
    return CloudEvent(
        id=event_id,
        source=source,
        type="sap.s4.beh.supplierinvoice.v1.SupplierInvoice.Created.v1",
        specversion="1.0",
        data={"Nothing": "here"},
    )


MALFORMED = (b'{"specversion": "1.0", "id": 7}', {"Content-Type": "application/cloudevents+json"})


def test_sap_dead_letters_an_event_and_a_malformed_body_once_and_names_them() -> None:
    producer = FakeLetterProducer()

    async def main() -> list[Any]:
        connector = _sap(producer, FakeClock())
        body, headers = MALFORMED
        answers: list[Any] = []
        for _ in range(2):
            answers.append(await connector.intake.handle_http(headers, body))
            answers.append(await connector.intake.ingest_event(_keyless_event("e-1")))
        # Another system's event with the same id is another event.
        answers.append(
            await connector.intake.ingest_event(_keyless_event("e-1", "/default/sap.s4/Q4H"))
        )
        await connector.routes[0].odata.close()
        return answers

    answers = asyncio.run(main())
    outcomes = [a[1]["outcome"] if isinstance(a, tuple) else a for a in answers]
    assert outcomes == ["dead_letter", "dead_letter", "duplicate", "duplicate", "dead_letter"]
    assert len(producer.sent) == 3
    assert {topic for topic, _, _ in producer.sent} == {"inference.invoice_risk.dlq"}
    named = producer.source_events()
    assert named[0] == malformed_letter_key(MALFORMED[0])
    assert all(key is not None and key.startswith("event:") for key in named[1:])
    assert len(set(named)) == 3
    assert all("here" not in (key or "") for key in named)  # ids and digests, no values


def test_a_restarted_sap_connector_writes_no_letter_the_dlq_already_holds() -> None:
    first = FakeLetterProducer()

    async def dead_letter_both(connector: SapConnector) -> list[str]:
        body, headers = MALFORMED
        malformed = await connector.intake.handle_http(headers, body)
        event = await connector.intake.ingest_event(_keyless_event("e-1"))
        await connector.routes[0].odata.close()
        return [malformed[1]["outcome"], event]

    assert asyncio.run(dead_letter_both(_sap(first, FakeClock()))) == ["dead_letter"] * 2
    second = FakeLetterProducer()
    restarted = _sap(second, FakeClock())
    # What start() does with the DLQ's headers (dead_lettered_events), without a broker.
    keys = [key for key in first.source_events() if key is not None]
    assert remember_letters(
        [*keys, "letter:uuid-1:-", "digest:00"],
        restarted.core.memory.published,
        restarted.core.memory.malformed,
    ) == (1, 1)
    assert asyncio.run(dead_letter_both(restarted)) == ["duplicate"] * 2
    assert second.sent == []
    assert restarted.stats.duplicates == 2


def test_the_sap_letter_keys_are_ids_and_digests() -> None:
    assert event_letter_key("0b5e-1") == "event:0b5e-1"
    key = malformed_letter_key(json.dumps({"Name": "Ada Lovelace"}).encode())
    assert key.startswith("malformed:")
    assert "Ada" not in key


class _ChangesOnce:
    """OData standing in for a system whose newest changes are unmappable: every poll reads
    them again (``ge`` the position), as a real one does."""

    def __init__(self, source: EntitySource, records: list[EntityRecord]) -> None:
        self.source = source
        self.records = records
        self.reads = 0

    async def read_changes(self, since: Any) -> AsyncIterator[Page]:
        self.reads += 1
        yield Page(self.records, None)

    async def close(self) -> None:
        return None


def _polling_sap(producer: FakeLetterProducer) -> tuple[SapConnector, _ChangesOnce]:
    mapping = load_mapping(SAP_MAPPING)
    changed = "2024-05-01T12:00:00Z"
    odata = _ChangesOnce(
        EntitySource.from_mapping(mapping.source),
        [
            # No amount: the mapping cannot fill the model (keyed by its change).
            EntityRecord(
                {
                    "CompanyCode": "1010",
                    "SupplierInvoice": "5105600001",
                    "FiscalYear": "2024",
                    "LastChangeDateTime": changed,
                },
                None,
            ),
            # No keys at all (keyed by its content).
            EntityRecord({"LastChangeDateTime": changed, "Name": "Ada"}, None),
        ],
    )
    settings = Settings(models={"invoice_risk": ModelSettings(feature_order=("amount_eur",))})
    connector = SapConnector(
        settings,
        mapping,
        odata,  # type: ignore[arg-type]
        secrets=(b"sap-unit-secret-0123456789",),
        name="sap-unit",
        monotonic=FakeClock(),
        letter_producer=producer,  # type: ignore[arg-type]
    )
    connector.core.checkpoints = _Checkpoints()  # type: ignore[assignment]
    return connector, odata


def test_polling_dead_letters_an_unmappable_change_once_however_often_it_is_read() -> None:
    first = FakeLetterProducer()
    connector, odata = _polling_sap(first)
    for _ in range(3):
        assert asyncio.run(connector.polling.poll_once()) == 0
    # The first poll reads twice (the second from the new position), each later one once.
    assert odata.reads == 4
    keys = first.source_events()
    assert [(key or "").split(":")[0] for key in keys] == ["event", "malformed"]
    assert connector.stats.dead_lettered == 2
    assert connector.stats.polled_letters_repeated == 6

    second = FakeLetterProducer()
    restarted, _ = _polling_sap(second)
    remember_letters(
        [key for key in keys if key],
        restarted.core.memory.published,
        restarted.core.memory.malformed,
    )
    assert asyncio.run(restarted.polling.poll_once()) == 0
    assert second.sent == []
    assert restarted.stats.dead_lettered == 0
