"""OData v2 and v4 as SAP Gateway speaks them: URLs, literals, envelopes, paging. Pure.

The differences that matter here:

============  ===========================================  ===================================
              v2 (``/sap/opu/odata/sap/<SRV>``)             v4 (``/sap/opu/odata4/...``)
============  ===========================================  ===================================
entity        ``{"d": {..., "__metadata": {"etag"}}}``      ``{"@odata.etag": ..., ...}``
collection    ``{"d": {"results": [...], "__next"}}``       ``{"value": [...], "@odata.nextLink"}``
dates         ``/Date(1714557600000)/``                      ``2024-05-01T10:00:00Z``
date literal  ``datetime'2024-05-01T10:00:00'`` or           ``2024-05-01T10:00:00Z``
              ``datetimeoffset'2024-05-01T10:00:00Z'``
update        ``MERGE`` (tunnelled: POST + X-HTTP-Method)    ``PATCH``
============  ===========================================  ===================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import quote, urljoin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connectors.common.dates import parse_datetime, to_iso_utc
from connectors.sap.exceptions import ODataError, SapConfigError

KeyKind = Literal["string", "int", "guid"]
ODataVersion = Literal[2, 4]


class EntitySource(BaseModel):
    """The mapping file's ``source`` section: where the connector reads entities."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    odata_version: ODataVersion = 2
    service: str = Field(min_length=1)
    """The service root path, e.g. ``/sap/opu/odata/sap/API_SUPPLIERINVOICE_PROCESS_SRV``."""
    entity_set: str = Field(min_length=1)
    keys: dict[str, KeyKind] = Field(min_length=1)
    """Key properties in key order, each with its literal kind; CloudEvent ``data`` names them."""
    event_types: tuple[str, ...] = ()
    """CloudEvent types this mapping handles; empty accepts every type."""
    delta_field: str = "LastChangeDateTime"
    delta_literal: Literal["datetime", "datetimeoffset"] = "datetimeoffset"
    page_size: int = Field(default=200, ge=1, le=5000)
    """``$top`` per request in polling mode; the server may page with fewer."""

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> EntitySource:
        try:
            return cls.model_validate(dict(section))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise SapConfigError(f"mapping source.{where}: {first['msg']}") from None

    @property
    def service_root(self) -> str:
        return self.service.rstrip("/") + "/"

    @property
    def collection_path(self) -> str:
        return f"{self.service.rstrip('/')}/{self.entity_set}"


def key_literal(value: Any, kind: KeyKind, version: ODataVersion) -> str:
    """One key value as an OData URL literal (quotes doubled inside strings)."""
    text = str(value)
    if kind == "int":
        if not text.lstrip("-").isdigit():
            raise ValueError(f"key value {text!r} is not an integer")
        return text
    if kind == "guid":
        return f"guid'{text}'" if version == 2 else text
    return "'" + text.replace("'", "''") + "'"


def key_predicate(source: EntitySource, values: Mapping[str, Any]) -> str:
    """``(SupplierInvoice='5105600001',FiscalYear='2024')`` for the given key values.

    Raises ``KeyError`` naming the first key property that ``values`` lacks.
    """
    parts = []
    for name, kind in source.keys.items():
        if name not in values or values[name] is None or values[name] == "":
            raise KeyError(name)
        parts.append(f"{name}={key_literal(values[name], kind, source.odata_version)}")
    return "(" + ",".join(parts) + ")"


def entity_path(source: EntitySource, predicate: str) -> str:
    """The path of one entity; the predicate is percent-encoded where it must be."""
    return source.collection_path + quote(predicate, safe="()',=-._~:")


def delta_filter(source: EntitySource, since: datetime) -> str:
    """``$filter`` for entities changed at or after ``since``.

    ``ge``, not ``gt``: entities changed in the same instant as the last one seen may arrive
    after it was read; re-reading the boundary costs one entity, and the request id derived
    from entity and change time makes it the same request.
    """
    moment = since.astimezone(UTC)
    if source.odata_version == 4:
        literal = to_iso_utc(moment)
    elif source.delta_literal == "datetime":
        literal = "datetime'" + to_iso_utc(moment).removesuffix("Z") + "'"
    else:
        literal = "datetimeoffset'" + to_iso_utc(moment) + "'"
    return f"{source.delta_field} ge {literal}"


def delta_params(source: EntitySource, since: datetime | None) -> dict[str, str]:
    """Query options of the first page of a delta read, oldest change first."""
    order = ",".join([f"{source.delta_field} asc", *(f"{name} asc" for name in source.keys)])
    params = {"$orderby": order, "$top": str(source.page_size)}
    if since is not None:
        params["$filter"] = delta_filter(source, since)
    if source.odata_version == 2:
        params["$format"] = "json"
    return params


def strip_metadata(entity: Mapping[str, Any]) -> dict[str, Any]:
    """The entity's properties without ``__metadata`` / ``@odata.*`` annotations."""
    return {
        name: value
        for name, value in entity.items()
        if name != "__metadata" and not name.startswith("@") and "@odata." not in name
    }


def entity_etag(entity: Mapping[str, Any]) -> str | None:
    metadata = entity.get("__metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("etag"), str):
        return str(metadata["etag"])
    etag = entity.get("@odata.etag")
    return etag if isinstance(etag, str) else None


@dataclass(frozen=True)
class EntityRecord:
    """One entity as read: its properties, and the ETag to send back with an update."""

    properties: dict[str, Any]
    etag: str | None


@dataclass(frozen=True)
class Page:
    records: list[EntityRecord]
    next_link: str | None


def parse_entity(
    payload: Any, version: ODataVersion, etag_header: str | None = None
) -> EntityRecord:
    """The single entity of a read response (``d`` envelope in v2, bare in v4)."""
    body = payload.get("d") if version == 2 and isinstance(payload, dict) else payload
    if not isinstance(body, dict):
        raise ODataError(f"OData v{version} entity response has no entity object")
    return EntityRecord(strip_metadata(body), entity_etag(body) or etag_header)


def parse_page(payload: Any, version: ODataVersion) -> Page:
    """The entities and the server-driven next link of one collection response."""
    if not isinstance(payload, dict):
        raise ODataError(f"OData v{version} collection response is not an object")
    if version == 2:
        body = payload.get("d")
        if isinstance(body, list):  # the OData v1 shape some services still send
            items, next_link = body, None
        elif isinstance(body, dict) and isinstance(body.get("results"), list):
            items, next_link = body["results"], body.get("__next")
        else:
            raise ODataError("OData v2 collection response has no d.results")
    else:
        if not isinstance(payload.get("value"), list):
            raise ODataError("OData v4 collection response has no value array")
        items, next_link = payload["value"], payload.get("@odata.nextLink")
    records = [
        EntityRecord(strip_metadata(item), entity_etag(item))
        for item in items
        if isinstance(item, dict)
    ]
    return Page(records, next_link if isinstance(next_link, str) and next_link else None)


def resolve_link(request_url: str, link: str) -> str:
    """A next link as an absolute URL: v2 ``__next`` is usually absolute, a v4 nextLink may be
    relative to the request URL."""
    return urljoin(request_url, link)


def delta_value(record: EntityRecord, source: EntitySource) -> datetime:
    """When the entity last changed (its ``delta_field``); ``ValueError`` if absent/invalid."""
    value = record.properties.get(source.delta_field)
    if value is None:
        raise ValueError(f"{source.delta_field} is missing")
    return parse_datetime(value)


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` in seconds: either delta-seconds or an HTTP date; ``None`` if absent."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


def error_message(payload: Any) -> str | None:
    """The message of an OData error body (v2 ``error.message.value``, v4 ``error.message``)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("error"), dict):
        return None
    message = payload["error"].get("message")
    if isinstance(message, dict):
        message = message.get("value")
    code = payload["error"].get("code")
    text = str(message) if message is not None else None
    return f"{code}: {text}" if code and text else text
