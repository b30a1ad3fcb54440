"""Change Data Capture events as Salesforce delivers them, and what the connector does with each.

Pure logic, no I/O. The rules come from Salesforce's documentation ("ChangeEventHeader
Fields" in the Change Data Capture Developer Guide, "Event Deserialization Considerations" in
the Pub/Sub API guide):

- ``recordIds`` may name several records that received the same change: one unit of work per
  record. A value ending in ``*`` (e.g. ``001*``) stands for every record of the object after
  a field type conversion: that is a resync, like ``GAP_OVERFLOW``.
- ``GAP_CREATE``/``GAP_UPDATE``/``GAP_UNDELETE`` carry no field values: the record is read
  through REST before it is scored, never dropped. ``GAP_OVERFLOW`` says too many changes
  happened to describe them: the whole entity is resynchronised, no per-record request.
- ``DELETE``/``GAP_DELETE`` invalidate the record's score (an :class:`Invalidate` per record).
  A merge in Salesforce arrives as an ``UPDATE`` of the surviving record and a ``DELETE`` of
  each merged-away record, so merged-away records are invalidated like deleted ones.
  ``UNDELETE``/``GAP_UNDELETE`` bring a record back: it is scored again.
- ``nulledFields`` name fields whose value is now null; a field absent from an update is
  unchanged (its current value is read through REST when the mapping needs it).
- Pub/Sub API delivers every schema field; unchanged fields are null. ``changedFields``,
  ``nulledFields`` and ``diffFields`` are bitmaps: the first element is a hex bitmap over the
  top-level schema fields (bit *i* is field *i*), later elements ``"<parent pos>-<hex>"`` are
  bitmaps over the fields of the compound field (``Name``, ``BillingAddress``) at that
  position. Compound values are flattened here to ``Parent.Child`` keys.
- The connector's own writeback comes back as a change event. It is recognised by
  ``changeOrigin`` (the REST ``Sforce-Call-Options: client=<id>`` the writer sends), by
  ``commitUser`` (the integration user), or by an update that touched only writeback and
  system fields, and skipped, or every score would trigger another score forever.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

SYSTEM_FIELDS = frozenset({"LastModifiedDate", "LastModifiedById", "SystemModstamp"})
"""Fields every update changes; they never make an update worth scoring on their own."""

HEADER_FIELD = "ChangeEventHeader"


class ChangeType(StrEnum):
    CREATE = "CREATE"
    UPDATE = "UPDATE"
    DELETE = "DELETE"
    UNDELETE = "UNDELETE"
    GAP_CREATE = "GAP_CREATE"
    GAP_UPDATE = "GAP_UPDATE"
    GAP_DELETE = "GAP_DELETE"
    GAP_UNDELETE = "GAP_UNDELETE"
    GAP_OVERFLOW = "GAP_OVERFLOW"

    @property
    def is_gap(self) -> bool:
        return self.value.startswith("GAP_")


@dataclass(frozen=True)
class ChangeEventHeader:
    entity_name: str
    record_ids: tuple[str, ...]
    change_type: ChangeType
    change_origin: str
    transaction_key: str
    sequence_number: int
    commit_timestamp: int
    commit_user: str
    changed_fields: tuple[str, ...] = ()
    """Decoded field names (compound members as ``Parent.Child``)."""
    nulled_fields: tuple[str, ...] = ()
    diff_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChangeEvent:
    """One decoded change event: its header and the field values it carries."""

    replay_id: bytes
    header: ChangeEventHeader
    values: Mapping[str, Any]
    """Known field values: non-null fields, plus ``None`` for fields named in ``nulledFields``.
    Unchanged fields are absent, since Pub/Sub API sends them as null."""


# ------------------------------------------------------------------------ bitmap decoding


def _value_schema(field_type: Any) -> Any:
    """The non-null branch of an optional field's union (Salesforce writes ``["null", T]``)."""
    if isinstance(field_type, list):
        branches = [branch for branch in field_type if branch != "null"]
        return branches[0] if len(branches) == 1 else field_type
    return field_type


def _bits(hex_bitmap: str) -> list[int]:
    """Positions of the set bits; bit 0 is the least significant bit of the whole number."""
    number = int(hex_bitmap, 16)
    return [position for position in range(number.bit_length()) if number >> position & 1]


def decode_bitmap(entries: Sequence[str], schema: Mapping[str, Any]) -> tuple[str, ...]:
    """Field names named by a ``changedFields``/``nulledFields``/``diffFields`` value.

    ``schema`` is the event's Avro schema (parsed JSON). A field name that is already plain
    text (as CometD delivers it) is kept as it is.
    """
    fields = schema["fields"]
    names: list[str] = []
    for entry in entries:
        if entry.startswith("0x"):
            names.extend(fields[position]["name"] for position in _bits(entry))
        elif "-" in entry and entry.split("-", 1)[1].startswith("0x"):
            parent_text, bitmap = entry.split("-", 1)
            parent = fields[int(parent_text)]
            nested = _value_schema(parent["type"])
            if not isinstance(nested, Mapping) or nested.get("type") != "record":
                raise ValueError(f"bitmap {entry!r} names {parent['name']}, not a compound field")
            names.extend(
                f"{parent['name']}.{nested['fields'][position]['name']}"
                for position in _bits(bitmap)
            )
        else:
            names.append(entry)
    return tuple(names)


def encode_bitmap(names: Iterable[str], schema: Mapping[str, Any]) -> list[str]:
    """The inverse of :func:`decode_bitmap` (used by the protocol test server)."""
    positions = {f["name"]: index for index, f in enumerate(schema["fields"])}
    top = 0
    nested: dict[int, int] = {}
    for name in names:
        if "." in name:
            parent_name, child_name = name.split(".", 1)
            parent_position = positions[parent_name]
            record = _value_schema(schema["fields"][parent_position]["type"])
            child_positions = {f["name"]: i for i, f in enumerate(record["fields"])}
            nested[parent_position] = nested.get(parent_position, 0) | (
                1 << child_positions[child_name]
            )
        else:
            top |= 1 << positions[name]
    entries = [f"0x{top:X}"] if top else []
    entries.extend(f"{position}-0x{bits:X}" for position, bits in sorted(nested.items()))
    return entries


# ------------------------------------------------------------------------ parsing


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested compound values as ``Parent.Child`` keys, nulls dropped."""
    flat: dict[str, Any] = {}
    for name, value in record.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def canonical_compound(name: str) -> str:
    """``BillingAddress.city`` (REST's compound value) as ``BillingAddress.City`` (CDC's):
    REST names compound members in lower camel case, CDC in upper camel case."""
    parent, separator, child = name.partition(".")
    if not separator or not child:
        return name
    return f"{parent}.{child[0].upper()}{child[1:]}"


def rest_values(record: Mapping[str, Any]) -> dict[str, Any]:
    """A REST record as flat field values keyed like CDC's: ``attributes`` dropped,
    compound members dotted and upper camel case, nulls kept as ``None``."""
    values: dict[str, Any] = {}
    for name, value in record.items():
        if name == "attributes":
            continue
        if isinstance(value, Mapping):
            for child, child_value in value.items():
                values[canonical_compound(f"{name}.{child}")] = child_value
        else:
            values[name] = value
    return values


def rest_field_names(input_fields: Iterable[str]) -> tuple[str, ...]:
    """The REST field names that read ``input_fields``: a compound member
    (``BillingAddress.City``) is read through its compound field (``BillingAddress``)."""
    return tuple(dict.fromkeys(name.split(".", 1)[0] for name in input_fields))


def parse_change_event(
    record: Mapping[str, Any], schema: Mapping[str, Any], replay_id: bytes
) -> ChangeEvent:
    """Turn a decoded Avro change event into a :class:`ChangeEvent`.

    Raises ``ValueError`` (or ``KeyError``) for a payload that is not a change event.
    """
    raw = record[HEADER_FIELD]
    header = ChangeEventHeader(
        entity_name=str(raw["entityName"]),
        record_ids=tuple(str(r) for r in raw["recordIds"]),
        change_type=ChangeType(raw["changeType"]),
        change_origin=str(raw.get("changeOrigin") or ""),
        transaction_key=str(raw.get("transactionKey") or ""),
        sequence_number=int(raw.get("sequenceNumber") or 0),
        commit_timestamp=int(raw.get("commitTimestamp") or 0),
        commit_user=str(raw.get("commitUser") or ""),
        changed_fields=decode_bitmap(raw.get("changedFields") or [], schema),
        nulled_fields=decode_bitmap(raw.get("nulledFields") or [], schema),
        diff_fields=decode_bitmap(raw.get("diffFields") or [], schema),
    )
    values: dict[str, Any] = flatten({k: v for k, v in record.items() if k != HEADER_FIELD})
    for name in header.nulled_fields:
        values[name] = None
    return ChangeEvent(replay_id=replay_id, header=header, values=values)


# ------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class ScoreRecord:
    """Score one record. ``values`` are what the event carried; ``needs_read`` says the
    event lacks some input field, so the record is read through REST first."""

    entity: str
    record_id: str
    source_event_id: str
    values: Mapping[str, Any]
    needs_read: bool


@dataclass(frozen=True)
class Invalidate:
    """The record was deleted (or merged away): its score no longer stands."""

    entity: str
    record_id: str
    source_event_id: str
    occurred_at_ms: int
    reason: str


@dataclass(frozen=True)
class ResyncEntity:
    """Re-read every record of ``entity`` changed since ``since_ms`` (epoch ms) and score it."""

    entity: str
    since_ms: int
    change_key: str

    def record_event_id(self, record_id: str) -> str:
        """The source event id of one resynced record (stable when the overflow replays)."""
        return f"{self.change_key}:resync:{record_id}"


@dataclass(frozen=True)
class Skip:
    """Nothing to do for these records; ``reason`` is a stable code for logs and metrics."""

    entity: str
    record_ids: tuple[str, ...]
    reason: str


Work = ScoreRecord | ResyncEntity | Invalidate | Skip


@dataclass(frozen=True)
class OwnChanges:
    """How the connector recognises its own writeback in the change stream."""

    client_id: str | None = None
    """The ``client=`` value the writer sends in ``Sforce-Call-Options``."""
    integration_users: frozenset[str] = frozenset()
    """``commitUser`` ids of the integration user(s) the connector writes as."""
    writeback_fields: frozenset[str] = field(default_factory=frozenset)
    """Fields only the connector writes; an update touching nothing else is its own."""

    def is_own(self, header: ChangeEventHeader) -> bool:
        if self.client_id and f"client={self.client_id}" in header.change_origin.split(";"):
            return True
        if header.commit_user and header.commit_user in self.integration_users:
            return True
        if header.change_type is ChangeType.UPDATE and self.writeback_fields:
            touched = set(header.changed_fields) | set(header.nulled_fields)
            return bool(touched) and touched <= (self.writeback_fields | SYSTEM_FIELDS)
        return False


def change_key(header: ChangeEventHeader, replay_id: bytes) -> str:
    """A stable id of one change: the transaction key and the change's sequence in it
    survive redelivery and replay (replay ids are not guaranteed unique across org
    migrations); the replay id stands in only where a transaction key is missing."""
    change = (
        f"{header.transaction_key}:{header.sequence_number}"
        if header.transaction_key
        else f"replay-{replay_id.hex()}"
    )
    return f"{header.entity_name}:{change}"


def source_event_id(header: ChangeEventHeader, replay_id: bytes, record_id: str) -> str:
    """The source event id of one record's change (a request id derives from it)."""
    return f"{change_key(header, replay_id)}:{record_id}"


def plan(event: ChangeEvent, input_fields: Collection[str], own: OwnChanges) -> list[Work]:
    """What to do for one change event, in record order.

    ``input_fields`` are the Salesforce fields the mapping reads; an update that changed none
    of them would score the same inputs again, so it is skipped.
    """
    header = event.header
    entity = header.entity_name
    if own.is_own(header):
        return [Skip(entity, header.record_ids, "own_writeback")]
    kind = header.change_type
    wildcard = any(record_id.endswith("*") for record_id in header.record_ids)
    if kind is ChangeType.GAP_OVERFLOW or wildcard:
        return [ResyncEntity(entity, header.commit_timestamp, change_key(header, event.replay_id))]
    if kind in (ChangeType.DELETE, ChangeType.GAP_DELETE):
        return [
            Invalidate(
                entity=entity,
                record_id=record_id,
                source_event_id=source_event_id(header, event.replay_id, record_id),
                occurred_at_ms=header.commit_timestamp,
                reason=kind.value.lower(),
            )
            for record_id in header.record_ids
        ]
    if kind is ChangeType.UPDATE:
        touched = set(header.changed_fields) | set(header.nulled_fields)
        if not touched & set(input_fields):
            return [Skip(entity, header.record_ids, "no_input_changed")]
    values = {} if kind.is_gap else dict(event.values)
    if kind in (ChangeType.CREATE, ChangeType.UNDELETE):
        # A create carries every populated field: an absent input is a null one.
        values = {name: None for name in input_fields} | values
    complete = not kind.is_gap and all(name in values for name in input_fields)
    return [
        ScoreRecord(
            entity=entity,
            record_id=record_id,
            source_event_id=source_event_id(header, event.replay_id, record_id),
            values=values,
            needs_read=not complete,
        )
        for record_id in header.record_ids
    ]
