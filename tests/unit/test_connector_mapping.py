"""Mapping files: from a source entity to an InferenceRequest, or a reason why not."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connectors.common.exceptions import MappingFileError
from connectors.common.mapping import Mapping, field_value, load_mapping, parse_mapping
from devkit.settings import load_demo_settings
from schemas.errors import UnservableRecord
from schemas.identity import request_id_for

EXAMPLE = Path(__file__).resolve().parents[2] / "connectors/sap/mappings/supplier_invoice.yaml"
NOW = datetime(2024, 5, 1, tzinfo=UTC)


def _invoice(**changes: Any) -> dict[str, Any]:
    entity: dict[str, Any] = {
        "CompanyCode": "1010",
        "SupplierInvoice": "5105600001",
        "FiscalYear": "2024",
        "InvoiceGrossAmount": "1234.50",
        "NetPaymentDays": 30,
        "DueCalculationBaseDate": "/Date(1714521600000)/",  # 2024-05-01
        "YY1_VendorTenureDays": 400,
        "YY1_PastLatePayments": "2",
        "YY1_NewBankAccount": "X",
        "YY1_SupplierCountry": "FR",
        "SupplierInvoiceOrigin": "5",
    }
    entity.update(changes)
    return {k: v for k, v in entity.items() if v is not None}


def _mapping(**changes: Any) -> Mapping:
    data: dict[str, Any] = {
        "model": "m",
        "source_system": "SYS",
        "entity_type": "Thing",
        "entity_id": "{id}",
        "features": {"x": {"path": "x"}},
    }
    data.update(changes)
    return parse_mapping(data)


def test_the_example_fills_every_feature_of_the_demo_model() -> None:
    mapping = load_mapping(EXAMPLE)
    assert mapping.model == "invoice_risk"
    assert mapping.missing_features(load_demo_settings().models["invoice_risk"].feature_order) == []


def test_the_example_maps_an_sap_invoice() -> None:
    mapping = load_mapping(EXAMPLE)
    request = mapping.to_request(_invoice(), source_event_id="evt-1", now=NOW)
    assert request.request_id == request_id_for("S4H", "evt-1")
    assert request.model == "invoice_risk"
    assert request.source is not None
    assert (request.source.system, request.source.entity_type, request.source.entity_id) == (
        "S4H",
        "SupplierInvoice",
        "1010/5105600001/2024",
    )
    assert request.inputs.features == {
        "amount_eur": 1234.5,
        "vendor_tenure_days": 400.0,
        "payment_terms_days": 30.0,
        "days_to_due": 30.0,  # due 30 days after the base date, which is today
        "past_late_payments": 2.0,
        "new_bank_account": 1.0,
        "foreign_vendor": 1.0,
        "manual_entry": 0.0,
    }


def test_a_redelivered_event_is_the_same_request() -> None:
    mapping = load_mapping(EXAMPLE)
    first = mapping.to_request(_invoice(), source_event_id="evt-1", now=NOW)
    again = mapping.to_request(_invoice(), source_event_id="evt-1", now=NOW)
    other = mapping.to_request(_invoice(), source_event_id="evt-2", now=NOW)
    assert first.request_id == again.request_id != other.request_id


def test_defaults_fill_missing_fields() -> None:
    request = load_mapping(EXAMPLE).to_request(
        _invoice(YY1_VendorTenureDays=None, NetPaymentDays=None), source_event_id="e", now=NOW
    )
    features = request.inputs.features or {}
    assert features["vendor_tenure_days"] == 0.0
    assert features["payment_terms_days"] == 30.0
    assert features["days_to_due"] == 0.0  # plus_days_path missing counts as 0 days


def test_a_missing_field_names_its_path() -> None:
    with pytest.raises(UnservableRecord) as failure:
        load_mapping(EXAMPLE).to_request(_invoice(InvoiceGrossAmount=None), source_event_id="e")
    assert failure.value.reason_code == "missing_field"
    assert "'InvoiceGrossAmount'" in failure.value.message
    assert "amount_eur" in failure.value.message


def test_a_missing_key_field_is_unmappable() -> None:
    with pytest.raises(UnservableRecord) as failure:
        load_mapping(EXAMPLE).to_request(_invoice(CompanyCode=""), source_event_id="e")
    assert failure.value.reason_code == "missing_key"
    assert "CompanyCode" in failure.value.message


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        ("12.5", "float", 12.5),
        (3, "float", 3.0),
        (True, "float", 1.0),
        ("7", "int", 7),
        (7.0, "int", 7),
        ("X", "bool", True),
        ("", "bool", False),
        ("false", "bool", False),
        (42, "str", "42"),
    ],
)
def test_values_convert_to_the_declared_type(value: object, kind: str, expected: object) -> None:
    mapping = _mapping(features={"x": {"path": "x", "type": kind}})
    converted = mapping.features({"x": value})["x"]
    assert converted == expected
    assert type(converted) is type(expected)


@pytest.mark.parametrize(
    ("value", "kind"),
    [("abc", "float"), ("nan", "float"), ("7.5", "int"), ("maybe", "bool"), ({"a": 1}, "str")],
)
def test_wrong_types_are_unmappable(value: object, kind: str) -> None:
    mapping = _mapping(features={"x": {"path": "x", "type": kind}})
    with pytest.raises(UnservableRecord) as failure:
        mapping.features({"x": value})
    assert failure.value.reason_code == "invalid_field"
    assert "'x'" in failure.value.message


def test_nested_paths_take_dots_or_slashes() -> None:
    entity = {"to_Supplier": {"Country": "DE", "Address": {"City": "Walldorf"}}}
    assert field_value(entity, "to_Supplier.Country") == "DE"
    assert field_value(entity, "to_Supplier/Address/City") == "Walldorf"
    assert field_value(entity, "to_Supplier.Missing.Deeper") is None
    assert field_value({"a": [1, 2]}, "a.0") is None


def test_code_tables_with_and_without_a_default() -> None:
    table = {"map": {"DE": 0, "AT": 0}}
    strict = _mapping(features={"x": {"path": "c", "transform": table}})
    lenient = _mapping(features={"x": {"path": "c", "transform": {**table, "map_default": 1}}})
    assert strict.features({"c": "AT"}) == {"x": 0.0}
    assert lenient.features({"c": "FR"}) == {"x": 1.0}
    with pytest.raises(UnservableRecord) as failure:
        strict.features({"c": "FR"})
    assert failure.value.reason_code == "unknown_code"


def test_scale_and_date_transforms() -> None:
    mapping = _mapping(
        features={
            "cents": {"path": "amount", "transform": {"scale": 100}},
            "age": {"path": "created", "transform": {"days_since": True}},
            "due_in": {
                "path": "base",
                "transform": {"days_until": True, "plus_days_path": "terms"},
            },
        }
    )
    features = mapping.features(
        {"amount": "1.5", "created": "2024-04-21T00:00:00Z", "base": "2024-04-30", "terms": 14},
        now=NOW,
    )
    assert features == {"cents": 150.0, "age": 10.0, "due_in": 13.0}
    with pytest.raises(UnservableRecord, match="no date"):
        mapping.features({"amount": 1, "created": "soon", "base": "2024-04-30"}, now=NOW)


def test_entity_ids_compose_several_fields() -> None:
    mapping = _mapping(entity_id="{a}/{b.c}")
    assert mapping.entity_id({"a": "x", "b": {"c": 7}}) == "x/7"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": ""}, "model"),
        ({"entity_id": "CompanyCode"}, "names no field"),
        ({"features": {}}, "features"),
        (
            {"features": {"x": {"path": "x", "transform": {"scale": 2, "days_since": True}}}},
            "exactly one",
        ),
        ({"features": {"x": {"path": "x", "type": "decimal"}}}, "features.x.type"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_mappings_say_what_is_wrong(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(MappingFileError, match=message):
        _mapping(**changes)


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(MappingFileError, match=r"broken\.yaml: invalid YAML"):
        load_mapping(broken)
    with pytest.raises(MappingFileError, match="cannot be read"):
        load_mapping(tmp_path / "absent.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(MappingFileError, match="top level"):
        load_mapping(listed)
