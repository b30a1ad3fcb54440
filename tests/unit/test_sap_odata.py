"""OData v2/v4 URLs, literals, envelopes and paging, as SAP Gateway speaks them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from connectors.sap.exceptions import ODataError, SapConfigError
from connectors.sap.odata import (
    EntityRecord,
    EntitySource,
    delta_filter,
    delta_params,
    delta_value,
    entity_path,
    error_message,
    key_literal,
    key_predicate,
    parse_entity,
    parse_page,
    resolve_link,
    retry_after_s,
)

V2 = EntitySource(
    service="/sap/opu/odata/sap/API_SUPPLIERINVOICE_PROCESS_SRV/",
    entity_set="A_SupplierInvoice",
    keys={"SupplierInvoice": "string", "FiscalYear": "string"},
)
V4 = V2.model_copy(update={"odata_version": 4, "service": "/sap/opu/odata4/x/0001"})
SINCE = datetime(2024, 5, 1, 10, 0, 0, 250000, tzinfo=UTC)


def test_key_predicates_quote_strings_and_keep_key_order() -> None:
    predicate = key_predicate(V2, {"FiscalYear": "2024", "SupplierInvoice": "5105600001"})
    assert predicate == "(SupplierInvoice='5105600001',FiscalYear='2024')"
    assert key_literal("O'Brien", "string", 2) == "'O''Brien'"
    assert key_literal(42, "int", 4) == "42"
    guid = "005056a2-1e2d-1eda-b0c1-d8b7b5b1d3c1"
    assert key_literal(guid, "guid", 2) == f"guid'{guid}'"
    assert key_literal(guid, "guid", 4) == guid
    with pytest.raises(ValueError, match="not an integer"):
        key_literal("4x", "int", 2)
    with pytest.raises(KeyError, match="FiscalYear"):
        key_predicate(V2, {"SupplierInvoice": "1"})


def test_entity_paths_encode_only_what_must_be() -> None:
    assert (
        entity_path(V2, "(SupplierInvoice='51 05',FiscalYear='2024')")
        == "/sap/opu/odata/sap/API_SUPPLIERINVOICE_PROCESS_SRV/A_SupplierInvoice"
        "(SupplierInvoice='51%2005',FiscalYear='2024')"
    )


def test_delta_filters_use_each_versions_literal() -> None:
    assert delta_filter(V2, SINCE) == (
        "LastChangeDateTime ge datetimeoffset'2024-05-01T10:00:00.250Z'"
    )
    legacy = V2.model_copy(update={"delta_literal": "datetime"})
    assert delta_filter(legacy, SINCE) == "LastChangeDateTime ge datetime'2024-05-01T10:00:00.250'"
    assert delta_filter(V4, SINCE) == "LastChangeDateTime ge 2024-05-01T10:00:00.250Z"


def test_delta_queries_order_by_change_then_key() -> None:
    assert delta_params(V2, None) == {
        "$orderby": "LastChangeDateTime asc,SupplierInvoice asc,FiscalYear asc",
        "$top": "200",
        "$format": "json",
    }
    assert delta_params(V4, SINCE)["$filter"].startswith("LastChangeDateTime ge 2024-05-01")
    assert "$format" not in delta_params(V4, SINCE)


def test_v2_entities_come_in_a_d_envelope_with_metadata() -> None:
    payload = {
        "d": {
            "__metadata": {"uri": "...", "type": "X", "etag": "W/\"'1'\""},
            "SupplierInvoice": "1",
            "InvoiceGrossAmount": "10.00",
        }
    }
    record = parse_entity(payload, 2)
    assert record == EntityRecord(
        {"SupplierInvoice": "1", "InvoiceGrossAmount": "10.00"}, "W/\"'1'\""
    )


def test_v4_entities_are_bare_with_an_annotation_etag() -> None:
    payload = {"@odata.context": "$metadata#X/$entity", "@odata.etag": 'W/"2"', "A": 1}
    assert parse_entity(payload, 4) == EntityRecord({"A": 1}, 'W/"2"')
    assert parse_entity({"A": 1}, 4, etag_header='W/"3"').etag == 'W/"3"'
    with pytest.raises(ODataError, match="no entity"):
        parse_entity({"value": []}, 2)


def test_v2_pages_carry_results_and_next() -> None:
    page = parse_page(
        {"d": {"results": [{"A": 1}, {"A": 2}], "__next": "https://h/x?$skiptoken=2"}}, 2
    )
    assert [r.properties for r in page.records] == [{"A": 1}, {"A": 2}]
    assert page.next_link == "https://h/x?$skiptoken=2"
    assert parse_page({"d": [{"A": 1}]}, 2).next_link is None  # the OData v1 shape
    with pytest.raises(ODataError, match=r"d\.results"):
        parse_page({"value": []}, 2)


def test_v4_pages_carry_value_and_next_link() -> None:
    page = parse_page(
        {"value": [{"A": 1, "@odata.etag": "e"}], "@odata.nextLink": "X?$skiptoken=1"}, 4
    )
    assert page.records == [EntityRecord({"A": 1}, "e")]
    assert page.next_link == "X?$skiptoken=1"
    assert parse_page({"value": []}, 4) == parse_page({"value": [], "@odata.nextLink": ""}, 4)
    with pytest.raises(ODataError, match="value array"):
        parse_page({"d": {}}, 4)


def test_next_links_resolve_against_the_request() -> None:
    request = "http://sap:8000/sap/opu/odata4/x/0001/SupplierInvoice?$top=100"
    assert resolve_link(request, "SupplierInvoice?$skiptoken=40") == (
        "http://sap:8000/sap/opu/odata4/x/0001/SupplierInvoice?$skiptoken=40"
    )
    absolute = "http://sap:8000/sap/opu/odata/sap/S/A?$skiptoken=40"
    assert resolve_link(request, absolute) == absolute


def test_the_change_time_of_an_entity() -> None:
    record = EntityRecord({"LastChangeDateTime": "/Date(1714557600000+0000)/"}, None)
    assert delta_value(record, V2) == datetime(2024, 5, 1, 10, tzinfo=UTC)
    with pytest.raises(ValueError, match="missing"):
        delta_value(EntityRecord({}, None), V2)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("7", 7.0),
        ("Wed, 01 May 2024 10:00:30 GMT", 30.0),
        ("Wed, 01 May 2024 09:00:00 GMT", 0.0),
        ("soon", None),
        (None, None),
    ],
)
def test_retry_after_in_seconds_or_as_a_date(header: str | None, expected: float | None) -> None:
    assert retry_after_s(header, now=datetime(2024, 5, 1, 10, tzinfo=UTC)) == expected


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"error": {"code": "X/1", "message": {"lang": "en", "value": "No"}}}, "X/1: No"),
        ({"error": {"code": "X/1", "message": "No"}}, "X/1: No"),
        ({"error": {"message": "No"}}, "No"),
        ({"nothing": 1}, None),
    ],
)
def test_error_messages_of_both_versions(payload: Any, expected: str | None) -> None:
    assert error_message(payload) == expected


def test_the_source_section_is_validated() -> None:
    with pytest.raises(SapConfigError, match=r"source\.keys"):
        EntitySource.from_mapping({"service": "/s", "entity_set": "E", "keys": {}})
    with pytest.raises(SapConfigError, match="odata_version"):
        EntitySource.from_mapping(
            {"service": "/s", "entity_set": "E", "keys": {"K": "string"}, "odata_version": 3}
        )
