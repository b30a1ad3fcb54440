"""CloudEvents 1.0 over HTTP, as SAP Event Mesh / Advanced Event Mesh deliver business events.

Three content modes (CloudEvents HTTP protocol binding):

- **structured**: ``Content-Type: application/cloudevents+json``, the whole event in the body
  (``data`` as JSON, or ``data_base64``);
- **binary**: attributes in ``ce-*`` headers, the body is ``data`` with the event's
  ``Content-Type``;
- **structured as plain JSON**: ``Content-Type: application/json`` without ``ce-*`` headers
  and a body that is an object with ``specversion`` (SAP Event Mesh sends this);
- **batched**: ``application/cloudevents-batch+json``, a JSON array of structured events.

An SAP business event (type like ``sap.s4.beh.supplierinvoice.v1.SupplierInvoice.Created.v1``)
carries the entity's keys in ``data``, not the entity: the connector reads the entity over
OData before mapping it. ``id`` (unique per ``source``) is what deduplicates redeliveries.
Parsing is pure; an invalid event raises :class:`UnservableRecord` naming what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.errors import UnservableRecord

STRUCTURED = "application/cloudevents+json"
BATCHED = "application/cloudevents-batch+json"
_REQUIRED = ("id", "source", "specversion", "type")
_KNOWN = frozenset(
    {*_REQUIRED, "datacontenttype", "dataschema", "subject", "time", "data", "data_base64"}
)


@dataclass(frozen=True)
class CloudEvent:
    id: str
    source: str
    type: str
    specversion: str = "1.0"
    subject: str | None = None
    time: str | None = None
    datacontenttype: str | None = None
    data: Any = None
    """JSON data decoded; other content types as ``bytes``."""
    extensions: dict[str, str] = field(default_factory=dict)

    def structured(self) -> dict[str, Any]:
        """The event in structured JSON form (how it is kept in a dead letter)."""
        body: dict[str, Any] = {
            "specversion": self.specversion,
            "id": self.id,
            "source": self.source,
            "type": self.type,
        }
        for name in ("subject", "time", "datacontenttype"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        body.update(self.extensions)
        if isinstance(self.data, bytes):
            body["data_base64"] = base64.b64encode(self.data).decode("ascii")
        elif self.data is not None:
            body["data"] = self.data
        return body


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _is_json(media_type: str) -> bool:
    return media_type in ("", "application/json", "text/json") or media_type.endswith("+json")


def _check_required(attributes: Mapping[str, Any]) -> None:
    for name in _REQUIRED:
        value = attributes.get(name)
        if not isinstance(value, str) or not value:
            raise UnservableRecord(
                "invalid_cloudevent", f"CloudEvent attribute {name!r} is missing or empty"
            )
    if attributes["specversion"] != "1.0":
        raise UnservableRecord(
            "invalid_cloudevent",
            f"CloudEvent specversion {attributes['specversion']!r} is not supported (only 1.0)",
        )


def from_structured(document: Any) -> CloudEvent:
    """One event from its structured JSON form (already parsed)."""
    if not isinstance(document, dict):
        raise UnservableRecord("invalid_cloudevent", "a structured CloudEvent must be an object")
    _check_required(document)
    media_type = _media_type(document.get("datacontenttype"))
    data: Any = document.get("data")
    if "data_base64" in document:
        try:
            raw = base64.b64decode(str(document["data_base64"]), validate=True)
        except (binascii.Error, ValueError):
            raise UnservableRecord("invalid_cloudevent", "data_base64 is not base64") from None
        data = _decode_data(raw, media_type)
    elif isinstance(data, str) and _is_json(media_type) and media_type:
        # Some senders put JSON data as a string; a JSON content type says it is JSON.
        data = _decode_data(data.encode("utf-8"), media_type)
    extensions = {
        name: str(value)
        for name, value in document.items()
        if name not in _KNOWN and isinstance(value, str | int | bool)
    }
    return CloudEvent(
        id=document["id"],
        source=document["source"],
        type=document["type"],
        specversion=document["specversion"],
        subject=_optional_text(document.get("subject")),
        time=_optional_text(document.get("time")),
        datacontenttype=_optional_text(document.get("datacontenttype")),
        data=data,
        extensions=extensions,
    )


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def _decode_data(raw: bytes, media_type: str) -> Any:
    if not raw:
        return None
    if not _is_json(media_type):
        return raw
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnservableRecord("invalid_cloudevent", f"data is not valid JSON: {exc}") from None


def from_binary(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    """One event from binary mode: ``ce-*`` headers and the body as data."""
    lowered = {name.lower(): value for name, value in headers.items()}
    attributes = {
        name[3:]: value for name, value in lowered.items() if name.startswith("ce-") and value
    }
    _check_required(attributes)
    content_type = lowered.get("content-type")
    known = {"id", "source", "specversion", "type", "subject", "time", "dataschema"}
    return CloudEvent(
        id=attributes["id"],
        source=attributes["source"],
        type=attributes["type"],
        specversion=attributes["specversion"],
        subject=attributes.get("subject"),
        time=attributes.get("time"),
        datacontenttype=content_type,
        data=_decode_data(body, _media_type(content_type)),
        extensions={k: v for k, v in attributes.items() if k not in known},
    )


def parse_http(headers: Mapping[str, str], body: bytes) -> list[CloudEvent]:
    """The events of one HTTP request, in any of the three modes.

    Raises :class:`UnservableRecord` when the request is none of them or breaks the spec.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    media_type = _media_type(lowered.get("content-type"))
    if media_type in (STRUCTURED, BATCHED):
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnservableRecord(
                "invalid_cloudevent", f"the body is not valid JSON: {exc}"
            ) from None
        if media_type == BATCHED:
            if not isinstance(document, list):
                raise UnservableRecord("invalid_cloudevent", "a batch must be a JSON array")
            return [from_structured(item) for item in document]
        return [from_structured(document)]
    if "ce-id" in lowered or "ce-specversion" in lowered:
        return [from_binary(lowered, body)]
    if media_type == "application/json":
        # SAP Event Mesh delivers structured events as plain application/json (no ce-*
        # headers): an object that carries specversion is a structured CloudEvent.
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnservableRecord(
                "invalid_cloudevent", f"the body is not valid JSON: {exc}"
            ) from None
        if isinstance(document, dict) and "specversion" in document:
            return [from_structured(document)]
    raise UnservableRecord(
        "invalid_cloudevent",
        f"neither a structured CloudEvent ({STRUCTURED}) nor binary mode (ce-* headers); "
        f"content type {media_type or 'none'!r}",
    )
