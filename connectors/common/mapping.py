"""Declarative mapping files: how a source entity becomes an ``InferenceRequest``.

A mapping file (YAML) names the model, the source system and entity type, how the entity id is
composed, and one entry per model feature::

    model: invoice_risk
    source_system: S4H
    entity_type: SupplierInvoice
    entity_id: "{CompanyCode}/{SupplierInvoice}/{FiscalYear}"
    explain: false
    features:
      amount_eur: {path: InvoiceGrossAmount, type: float}
      payment_terms_days: {path: NetPaymentDays, type: float, default: 30}
      foreign_vendor:
        path: to_Supplier.Country        # nested: "." or "/" between levels
        type: float
        transform: {map: {DE: 0}, map_default: 1}
      days_to_due:
        path: DueCalculationBaseDate
        type: float
        transform: {days_until: true, plus_days_path: NetPaymentDays}
    source: {...}      # connector-specific: where entities come from (kept as given)
    writeback: {...}   # connector-specific: where results go (kept as given)

Applying a mapping is pure (the clock is a parameter), so it is unit-tested without I/O. A
record that cannot be mapped raises :class:`UnmappableRecord` naming the field path; the
connector dead-letters it with its source payload.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from connectors.common.dates import parse_datetime
from connectors.common.exceptions import MappingFileError, UnmappableRecord
from schemas.identity import request_id_for
from schemas.models import InferenceRequest, Inputs, Source

FeatureType = Literal["float", "int", "str", "bool"]
Scalar = float | int | str | bool

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_PATH_SEPARATOR = re.compile(r"[./]")
_TRUE_TEXT = frozenset({"true", "x", "1", "yes"})
"""ABAP booleans are ``X`` and blank; OData and JSON say ``true``/``false``."""
_FALSE_TEXT = frozenset({"false", "", "0", "no"})
_SECONDS_PER_DAY = 86_400.0


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Transform(_Spec):
    """One transformation of a field's value, applied before the type conversion.

    Exactly one kind: ``scale`` (multiply a number), ``map`` (code table, with an optional
    ``map_default`` for codes it does not list), ``days_until`` / ``days_since`` (a date
    against the current time, in days, optionally ``plus_days_path`` days later).
    """

    scale: float | None = None
    map: dict[str, Scalar] | None = None
    map_default: Scalar | None = None
    days_until: bool = False
    days_since: bool = False
    plus_days_path: str | None = None

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> Self:
        kinds = [
            name
            for name, given in (
                ("scale", self.scale is not None),
                ("map", self.map is not None),
                ("days_until", self.days_until),
                ("days_since", self.days_since),
            )
            if given
        ]
        if len(kinds) != 1:
            raise ValueError(
                f"a transform needs exactly one of scale, map, days_until, days_since; got {kinds}"
            )
        if self.map_default is not None and self.map is None:
            raise ValueError("map_default only goes with map")
        if self.plus_days_path is not None and not (self.days_until or self.days_since):
            raise ValueError("plus_days_path only goes with days_until or days_since")
        return self


class FeatureSpec(_Spec):
    path: str = Field(min_length=1)
    type: FeatureType = "float"
    default: Scalar | None = None
    """Used when the field is missing or null; without it such a record is unmappable."""
    transform: Transform | None = None


class MappingSpec(_Spec):
    """The file's contents, validated."""

    model: str = Field(min_length=1)
    source_system: str = Field(min_length=1)
    entity_type: str = Field(min_length=1)
    entity_id: str = Field(min_length=1)
    """A template of field paths in braces, e.g. ``{CompanyCode}/{SupplierInvoice}``."""
    explain: bool = False
    features: dict[str, FeatureSpec] = Field(min_length=1)
    source: dict[str, Any] = Field(default_factory=dict)
    writeback: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _entity_id_names_fields(self) -> Self:
        if not _PLACEHOLDER.search(self.entity_id):
            raise ValueError(
                f"entity_id {self.entity_id!r} names no field: write paths in braces, "
                "e.g. '{SupplierInvoice}'"
            )
        return self


def field_value(entity: dict[str, Any], path: str) -> Any:
    """The value at ``path`` (``a.b`` or ``a/b``), or ``None`` where any level is missing.

    A level that is an OData v2 ``{"results": [...]}`` or a list is not descended into: a
    feature is one value, not a collection.
    """
    current: Any = entity
    for part in _PATH_SEPARATOR.split(path):
        if not isinstance(current, dict) or part not in current:
            return None
        current = current[part]
    return current


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        # OData v2 sends Edm.Decimal and Edm.Int64 as strings ("1234.50").
        try:
            number = float(value.strip())
        except ValueError:
            raise UnmappableRecord(
                "invalid_field", f"field {path!r}: {_described(value)} that is not a number"
            ) from None
    else:
        raise UnmappableRecord(
            "invalid_field", f"field {path!r}: {_described(value)}, not a number"
        )
    if not math.isfinite(number):
        raise UnmappableRecord("invalid_field", f"field {path!r}: a number that is not finite")
    return number


def _described(value: Any) -> str:
    """What a value is, never what it says: a record's values may be personal data, and
    these messages reach logs and dead letters."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a text"
    if isinstance(value, dict | list):
        return "a structure"
    return f"a {type(value).__name__}"


def _convert(value: Any, kind: FeatureType, path: str) -> Scalar:
    if kind == "float":
        return _number(value, path)
    if kind == "int":
        number = _number(value, path)
        if not number.is_integer():
            raise UnmappableRecord("invalid_field", f"field {path!r}: a number that is not whole")
        return int(number)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE_TEXT:
            return True
        if text in _FALSE_TEXT:
            return False
        raise UnmappableRecord(
            "invalid_field", f"field {path!r}: {_described(value)} that is not a boolean"
        )
    if isinstance(value, dict | list):
        raise UnmappableRecord("invalid_field", f"field {path!r}: a structure, not a text")
    return value if isinstance(value, str) else str(value)


class Mapping:
    """A loaded mapping: turns source entities into requests for one model."""

    def __init__(self, spec: MappingSpec, *, clock: Callable[[], datetime] | None = None) -> None:
        self.spec = spec
        self._clock = clock or (lambda: datetime.now(UTC))

    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def source_system(self) -> str:
        return self.spec.source_system

    @property
    def entity_type(self) -> str:
        return self.spec.entity_type

    @property
    def source(self) -> dict[str, Any]:
        return self.spec.source

    @property
    def writeback(self) -> dict[str, Any]:
        return self.spec.writeback

    def missing_features(self, feature_order: tuple[str, ...]) -> list[str]:
        """Model features this mapping does not fill (checked against the model's settings)."""
        return [name for name in feature_order if name not in self.spec.features]

    def entity_id(self, entity: dict[str, Any]) -> str:
        """The entity id from the template; raises :class:`UnmappableRecord` if a key is missing."""

        def fill(match: re.Match[str]) -> str:
            path = match.group(1).strip()
            value = field_value(entity, path)
            if value is None or value == "":
                raise UnmappableRecord("missing_key", f"key field {path!r} is missing")
            if isinstance(value, dict | list):
                raise UnmappableRecord("invalid_key", f"key field {path!r} is not a value")
            return str(value)

        return _PLACEHOLDER.sub(fill, self.spec.entity_id)

    def features(self, entity: dict[str, Any], *, now: datetime | None = None) -> dict[str, Scalar]:
        """The feature record of ``entity``; raises :class:`UnmappableRecord` naming the path."""
        moment = now or self._clock()
        return {
            name: self._feature(entity, name, spec, moment)
            for name, spec in self.spec.features.items()
        }

    def to_request(
        self,
        entity: dict[str, Any],
        *,
        source_event_id: str,
        now: datetime | None = None,
        correlation_id: str | None = None,
    ) -> InferenceRequest:
        """The request for one entity. Its id follows ``source_event_id``, so a redelivered
        event is the same request, never a second one. ``correlation_id`` travels into the
        result (a connector uses it to find the entity to write back to)."""
        return InferenceRequest(
            correlation_id=correlation_id,
            request_id=request_id_for(self.source_system, source_event_id),
            model=self.model,
            inputs=Inputs(features=dict(self.features(entity, now=now))),
            explain=self.spec.explain,
            source=Source(
                system=self.source_system,
                entity_type=self.entity_type,
                entity_id=self.entity_id(entity),
            ),
        )

    def _feature(
        self, entity: dict[str, Any], name: str, spec: FeatureSpec, now: datetime
    ) -> Scalar:
        raw = field_value(entity, spec.path)
        if raw is None:
            if spec.default is None:
                raise UnmappableRecord(
                    "missing_field", f"field {spec.path!r} (feature {name!r}) is missing"
                )
            return _convert(spec.default, spec.type, spec.path)
        value: Any = raw
        transform = spec.transform
        if transform is not None:
            value = self._transform(entity, spec.path, raw, transform, now)
        return _convert(value, spec.type, spec.path)

    @staticmethod
    def _transform(
        entity: dict[str, Any], path: str, raw: Any, transform: Transform, now: datetime
    ) -> Any:
        if transform.scale is not None:
            return _number(raw, path) * transform.scale
        if transform.map is not None:
            code = str(raw).strip()
            if code in transform.map:
                return transform.map[code]
            if transform.map_default is not None:
                return transform.map_default
            raise UnmappableRecord(
                "unknown_code", f"field {path!r}: a code that is not in the mapping's table"
            )
        try:
            moment = parse_datetime(raw)
        except ValueError:
            raise UnmappableRecord(
                "invalid_field", f"field {path!r}: {_described(raw)} that is no date"
            ) from None
        extra_days = 0.0
        if transform.plus_days_path is not None:
            extra = field_value(entity, transform.plus_days_path)
            extra_days = 0.0 if extra is None else _number(extra, transform.plus_days_path)
        days = (moment - now).total_seconds() / _SECONDS_PER_DAY + extra_days
        return round(days if transform.days_until else -days, 3)


def parse_mapping(data: Any, *, origin: str = "mapping") -> Mapping:
    """A mapping from already-parsed YAML/JSON data; errors name ``origin`` and the setting."""
    if not isinstance(data, dict):
        raise MappingFileError(f"{origin}: the top level must be a mapping of settings")
    try:
        return Mapping(MappingSpec.model_validate(data))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more)" if more else ""
        raise MappingFileError(f"{origin}: {where}: {first['msg']}{suffix}") from None


def load_mapping(path: Path | str) -> Mapping:
    """Read and validate a mapping file; raises :class:`MappingFileError` naming the problem."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise MappingFileError(f"mapping file {file}: cannot be read ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MappingFileError(f"mapping file {file}: invalid YAML ({exc})") from None
    return parse_mapping(data, origin=f"mapping file {file}")
