"""Change Data Capture events: bitmaps, parsing, and what each change type becomes."""

from __future__ import annotations

from typing import Any

import pytest

from connectors.salesforce.cdc import (
    ChangeEvent,
    ChangeEventHeader,
    ChangeType,
    Invalidate,
    OwnChanges,
    ResyncEntity,
    ScoreRecord,
    Skip,
    decode_bitmap,
    encode_bitmap,
    parse_change_event,
    plan,
    rest_field_names,
    rest_values,
    source_event_id,
)
from tests.salesforce_server import change_event_schema

CONTACT = change_event_schema(
    "Contact",
    {
        "Name": {"Salutation": "string", "FirstName": "string", "LastName": "string"},
        "Email": "string",
        "Score__c": "double",
        "MailingAddress": {"Street": "string", "City": "string", "Country": "string"},
        "LastModifiedDate": "long",
    },
)
INPUTS = ("Email", "Name.LastName")


def _header(**fields: Any) -> dict[str, Any]:
    return {
        "entityName": "Contact",
        "recordIds": ["003A"],
        "changeType": "UPDATE",
        "changeOrigin": "",
        "transactionKey": "tx-1",
        "sequenceNumber": 1,
        "commitTimestamp": 1_700_000_000_000,
        "commitNumber": 1,
        "commitUser": "005HUMAN",
        "nulledFields": [],
        "diffFields": [],
        "changedFields": [],
        **fields,
    }


def _event(values: dict[str, Any] | None = None, **header: Any) -> ChangeEvent:
    record: dict[str, Any] = {
        "ChangeEventHeader": _header(**header),
        "Name": None,
        "Email": None,
        "Score__c": None,
        "MailingAddress": None,
        "LastModifiedDate": None,
        **(values or {}),
    }
    return parse_change_event(record, CONTACT, b"\x00\x01")


def test_a_top_level_bitmap_names_fields_by_schema_position() -> None:
    # Position 0 is the header; Email is position 2, Score__c 3, LastModifiedDate 5.
    assert decode_bitmap(["0x2C"], CONTACT) == ("Email", "Score__c", "LastModifiedDate")


def test_a_compound_bitmap_names_the_members_of_the_field_at_its_position() -> None:
    # "1-0x6": in Name (position 1), FirstName (bit 1) and LastName (bit 2).
    names = decode_bitmap(["0x4", "1-0x6", "4-0x2"], CONTACT)
    assert names == ("Email", "Name.FirstName", "Name.LastName", "MailingAddress.City")


def test_plain_field_names_pass_through_and_bitmaps_round_trip() -> None:
    assert decode_bitmap(["Email"], CONTACT) == ("Email",)
    names = ["Email", "Name.LastName", "MailingAddress.Country", "LastModifiedDate"]
    assert list(decode_bitmap(encode_bitmap(names, CONTACT), CONTACT)) == [
        "Email",
        "LastModifiedDate",
        "Name.LastName",
        "MailingAddress.Country",
    ]


def test_a_compound_bitmap_on_a_plain_field_is_refused() -> None:
    with pytest.raises(ValueError, match="not a compound field"):
        decode_bitmap(["2-0x1"], CONTACT)


def test_parsing_flattens_compound_values_and_keeps_nulled_fields() -> None:
    event = _event(
        {"Name": {"Salutation": None, "FirstName": None, "LastName": "Lovelace"}},
        changedFields=encode_bitmap(["Name.LastName"], CONTACT),
        nulledFields=encode_bitmap(["Email"], CONTACT),
    )
    assert event.header.change_type is ChangeType.UPDATE
    assert event.header.changed_fields == ("Name.LastName",)
    assert dict(event.values) == {"Name.LastName": "Lovelace", "Email": None}


def test_one_event_naming_several_records_is_one_unit_of_work_per_record() -> None:
    event = _event(
        {"Email": "a@example.com", "Name": {"LastName": "X"}},
        changeType="CREATE",
        recordIds=["003A", "003B", "003C"],
    )
    work = plan(event, INPUTS, OwnChanges())
    assert [w.record_id for w in work if isinstance(w, ScoreRecord)] == ["003A", "003B", "003C"]
    assert all(isinstance(w, ScoreRecord) and not w.needs_read for w in work)
    assert len({w.source_event_id for w in work if isinstance(w, ScoreRecord)}) == 3


@pytest.mark.parametrize("kind", ["GAP_CREATE", "GAP_UPDATE", "GAP_UNDELETE"])
def test_gap_events_carry_no_values_so_the_record_is_read_first(kind: str) -> None:
    work = plan(_event(changeType=kind, recordIds=["003A", "003B"]), INPUTS, OwnChanges())
    assert [type(w) for w in work] == [ScoreRecord, ScoreRecord]
    assert all(isinstance(w, ScoreRecord) and w.needs_read and not w.values for w in work)


def test_gap_overflow_resyncs_the_entity_without_per_record_work() -> None:
    work = plan(_event(changeType="GAP_OVERFLOW", recordIds=[]), INPUTS, OwnChanges())
    assert work == [ResyncEntity("Contact", 1_700_000_000_000, "Contact:tx-1:1")]
    resync = work[0]
    assert isinstance(resync, ResyncEntity)
    assert resync.record_event_id("003A") == "Contact:tx-1:1:resync:003A"


def test_a_wildcard_record_id_resyncs_too() -> None:
    work = plan(_event(changeType="UPDATE", recordIds=["003*"]), INPUTS, OwnChanges())
    assert [type(w) for w in work] == [ResyncEntity]


def test_own_writeback_is_recognised_by_change_origin() -> None:
    own = OwnChanges(client_id="sluiceway-prod")
    event = _event(
        {"Score__c": 0.7},
        changeOrigin="com/salesforce/api/rest/62.0;client=sluiceway-prod",
        changedFields=encode_bitmap(["Score__c", "Email"], CONTACT),
    )
    assert plan(event, INPUTS, own) == [Skip("Contact", ("003A",), "own_writeback")]
    other = _event(
        {"Email": "b@example.com"},
        changeOrigin="com/salesforce/api/rest/62.0;client=sluiceway-prod-2",
        changedFields=encode_bitmap(["Email"], CONTACT),
    )
    assert isinstance(plan(other, INPUTS, own)[0], ScoreRecord)


def test_own_writeback_is_recognised_by_commit_user_or_by_the_fields_it_touched() -> None:
    by_user = OwnChanges(integration_users=frozenset({"005INTEGRATION"}))
    event = _event(commitUser="005INTEGRATION", changedFields=encode_bitmap(["Email"], CONTACT))
    assert plan(event, INPUTS, by_user)[0] == Skip("Contact", ("003A",), "own_writeback")
    by_fields = OwnChanges(writeback_fields=frozenset({"Score__c"}))
    only_score = _event(changedFields=encode_bitmap(["Score__c", "LastModifiedDate"], CONTACT))
    assert plan(only_score, ("Score__c",), by_fields)[0].reason == "own_writeback"  # type: ignore[union-attr]


def test_deletes_invalidate_each_record_and_updates_of_no_input_field_are_skipped() -> None:
    deleted = plan(_event(changeType="DELETE", recordIds=["003A", "003B"]), INPUTS, OwnChanges())
    assert deleted == [
        Invalidate("Contact", "003A", "Contact:tx-1:1:003A", 1_700_000_000_000, "delete"),
        Invalidate("Contact", "003B", "Contact:tx-1:1:003B", 1_700_000_000_000, "delete"),
    ]
    gap = plan(_event(changeType="GAP_DELETE"), INPUTS, OwnChanges())
    assert gap == [
        Invalidate("Contact", "003A", "Contact:tx-1:1:003A", 1_700_000_000_000, "gap_delete")
    ]
    unrelated = _event({"Score__c": 1.0}, changedFields=encode_bitmap(["Score__c"], CONTACT))
    assert plan(unrelated, INPUTS, OwnChanges())[0].reason == "no_input_changed"  # type: ignore[union-attr]


def test_an_update_of_some_inputs_needs_the_rest_of_the_record() -> None:
    event = _event({"Email": "c@example.com"}, changedFields=encode_bitmap(["Email"], CONTACT))
    (work,) = plan(event, INPUTS, OwnChanges())
    assert isinstance(work, ScoreRecord)
    assert work.needs_read
    assert work.values == {"Email": "c@example.com"}


def test_a_create_is_complete_even_where_an_input_is_empty() -> None:
    event = _event({"Email": "d@example.com"}, changeType="CREATE")
    (work,) = plan(event, INPUTS, OwnChanges())
    assert isinstance(work, ScoreRecord)
    assert not work.needs_read
    assert work.values["Name.LastName"] is None


def test_source_event_ids_are_stable_across_redelivery() -> None:
    header = ChangeEventHeader(
        entity_name="Contact",
        record_ids=("003A",),
        change_type=ChangeType.UPDATE,
        change_origin="",
        transaction_key="tx-9",
        sequence_number=2,
        commit_timestamp=0,
        commit_user="",
    )
    # The replay id may differ on redelivery (org migration); the transaction key does not.
    assert source_event_id(header, b"\x01", "003A") == source_event_id(header, b"\x02", "003A")
    assert source_event_id(header, b"\x01", "003A") == "Contact:tx-9:2:003A"
    no_key = ChangeEventHeader(**{**header.__dict__, "transaction_key": ""})
    assert source_event_id(no_key, b"\x0a", "003A") == "Contact:replay-0a:003A"


def test_an_undelete_scores_the_record_again() -> None:
    event = _event({"Email": "u@example.com"}, changeType="UNDELETE")
    (work,) = plan(event, INPUTS, OwnChanges())
    assert isinstance(work, ScoreRecord)
    assert work.values == {"Email": "u@example.com", "Name.LastName": None}


def test_nulled_fields_are_null_and_absent_fields_are_unchanged() -> None:
    event = _event(
        {"Email": None},
        changedFields=encode_bitmap(["LastModifiedDate"], CONTACT),
        nulledFields=encode_bitmap(["Email"], CONTACT),
    )
    (work,) = plan(event, INPUTS, OwnChanges())
    assert isinstance(work, ScoreRecord)
    # Email is now null; Name.LastName was not touched: it is read, never assumed null.
    assert work.values == {"Email": None}
    assert work.needs_read


def test_compound_members_read_through_rest_are_keyed_as_cdc_keys_them() -> None:
    record = {
        "attributes": {"type": "Account"},
        "Id": "001A",
        "BillingAddress": {"city": "Lyon", "postalCode": "69001", "street": None},
        "Rating": None,
    }
    assert rest_values(record) == {
        "Id": "001A",
        "BillingAddress.City": "Lyon",
        "BillingAddress.PostalCode": "69001",
        "BillingAddress.Street": None,
        "Rating": None,
    }
    assert rest_field_names(["Rating", "BillingAddress.City", "BillingAddress.PostalCode"]) == (
        "Rating",
        "BillingAddress",
    )
