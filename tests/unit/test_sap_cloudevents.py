"""CloudEvents over HTTP: structured, binary and batched mode, and what is not an event."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from connectors.sap.cloudevents import CloudEvent, from_structured, parse_http
from schemas.errors import UnservableRecord

CREATED = "sap.s4.beh.supplierinvoice.v1.SupplierInvoice.Created.v1"


def _event(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "type": CREATED,
        "source": "/default/sap.s4.beh/S4HCLNT100",
        "id": "a823e884-5edc-4194-a81a-f3a3632417ee",
        "time": "2024-05-01T10:00:00Z",
        "datacontenttype": "application/json",
        "data": {"SupplierInvoice": "5105600001", "FiscalYear": "2024"},
    }
    event.update(changes)
    return {k: v for k, v in event.items() if v is not None}


def test_structured_mode() -> None:
    (event,) = parse_http(
        {"Content-Type": "application/cloudevents+json; charset=utf-8"},
        json.dumps(_event(sapcontext="eyJ0eXAiOiJKV1QifQ")).encode(),
    )
    assert event.id == "a823e884-5edc-4194-a81a-f3a3632417ee"
    assert event.type == CREATED
    assert event.data == {"SupplierInvoice": "5105600001", "FiscalYear": "2024"}
    assert event.extensions == {"sapcontext": "eyJ0eXAiOiJKV1QifQ"}


def test_binary_mode() -> None:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "evt-7",
        "ce-source": "/default/sap.s4.beh/S4HCLNT100",
        "ce-type": CREATED,
        "ce-time": "2024-05-01T10:00:00Z",
        "Content-Type": "application/json",
    }
    (event,) = parse_http(headers, b'{"SupplierInvoice": "5105600001", "FiscalYear": "2024"}')
    assert (event.id, event.type, event.time) == ("evt-7", CREATED, "2024-05-01T10:00:00Z")
    assert event.data == {"SupplierInvoice": "5105600001", "FiscalYear": "2024"}
    assert event.datacontenttype == "application/json"


def test_batched_mode() -> None:
    events = parse_http(
        {"content-type": "application/cloudevents-batch+json"},
        json.dumps([_event(id="1"), _event(id="2")]).encode(),
    )
    assert [e.id for e in events] == ["1", "2"]


def test_base64_data_is_decoded_by_its_content_type() -> None:
    raw = json.dumps({"SupplierInvoice": "1"}).encode()
    event = from_structured(_event(data=None, data_base64=base64.b64encode(raw).decode()))
    assert event.data == {"SupplierInvoice": "1"}
    binary = from_structured(
        _event(data=None, datacontenttype="application/octet-stream", data_base64="AAE=")
    )
    assert binary.data == b"\x00\x01"


def test_the_structured_form_round_trips() -> None:
    original = from_structured(_event(subject="invoice"))
    assert from_structured(original.structured()) == original
    assert (
        CloudEvent(id="1", source="s", type="t", data=b"\x00").structured()["data_base64"] == "AA=="
    )


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        ({"content-type": "application/json"}, b"{}", "neither a structured"),
        ({"content-type": "application/cloudevents+json"}, b"{not json", "not valid JSON"),
        ({"content-type": "application/cloudevents+json"}, b"[]", "must be an object"),
        ({"content-type": "application/cloudevents-batch+json"}, b"{}", "JSON array"),
        (
            {"content-type": "application/cloudevents+json"},
            json.dumps(_event(id=None)).encode(),
            "'id' is missing",
        ),
        (
            {"content-type": "application/cloudevents+json"},
            json.dumps(_event(specversion="0.3")).encode(),
            "specversion",
        ),
        ({"ce-id": "1", "ce-specversion": "1.0", "ce-type": "t"}, b"", "'source' is missing"),
        (
            {
                "ce-id": "1",
                "ce-specversion": "1.0",
                "ce-type": "t",
                "ce-source": "s",
                "content-type": "application/json",
            },
            b"{broken",
            "data is not valid JSON",
        ),
    ],
)
def test_invalid_requests_say_why(headers: dict[str, str], body: bytes, message: str) -> None:
    with pytest.raises(UnservableRecord, match=message) as failure:
        parse_http(headers, body)
    assert failure.value.reason_code == "invalid_cloudevent"


def test_a_structured_event_sent_as_plain_json_is_accepted() -> None:
    # SAP Event Mesh delivers structured events with Content-Type application/json.
    (event,) = parse_http(
        {"Content-Type": "application/json; charset=utf-8"}, json.dumps(_event()).encode()
    )
    assert (event.type, event.data) == (CREATED, _event()["data"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{broken", "not valid JSON"),
        (b'{"SupplierInvoice": "1"}', "neither a structured CloudEvent"),
        (b"[1, 2]", "neither a structured CloudEvent"),
        (json.dumps(_event(id="")).encode(), "'id' is missing"),
    ],
)
def test_plain_json_that_is_no_cloudevent_is_refused(body: bytes, message: str) -> None:
    with pytest.raises(UnservableRecord, match=message):
        parse_http({"Content-Type": "application/json"}, body)
