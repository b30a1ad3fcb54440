"""What a result writes back to SAP, and where. Pure.

The mapping file's ``writeback`` section::

    writeback:
      method: patch                 # patch: update fields (PATCH in v4, MERGE in v2, If-Match)
      output: score                 # the result's output tensor whose first value is written
      fields: {YY1_RiskScore: "{score:.4f}", YY1_RiskRequestId: "{request_id}"}
      marker_field: YY1_RiskRequestId   # holds the request id once written: a replay skips

    writeback:
      method: action                # a function import (v2) / bound action (v4) instead
      output: score
      action: Release
      parameters:                   # a template (Edm.String), or a template with its Edm type
        Note: "risk {score:.2f}"
        Approved: {value: "true", type: Edm.Boolean}
        RiskScore: {value: "{score:.4f}", type: Edm.Decimal}
      only_if: {below: 0.3}         # write only when the output is below 0.3 (else skipped)

Parameters follow the OData V2 URI literal rules in a function import's query string
(``Edm.String`` quoted with quotes doubled, ``Edm.Boolean`` ``true``/``false``, integers bare,
``Edm.Int64`` with ``L``, ``Edm.Decimal`` ``M``, ``Edm.Double`` ``d``, ``Edm.Single`` ``f``,
``guid'..'``, ``datetime'..'``), and JSON types in a v4 action's body: a gateway refuses a
quoted boolean. A value that does not parse as its type is refused when the result is
planned (``Skip("invalid_parameter")``), never sent as something else.

Templates are Python format strings over ``score`` (float), ``request_id``, ``model`` and
``model_version``. Results are matched to entities through the request's ``correlation_id``,
which the connector sets to ``sap|<connector>|<key predicate>|<request id>|<mac>``, signed with
the connector secret (:mod:`connectors.common.correlation`); the worker copies it into the
result, so the writeback needs no lookup table and survives restarts, and a result of a request
the connector did not publish is never written back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal
from urllib.parse import quote
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from connectors.common.correlation import CorrelationSigner, Rejected, Verified
from connectors.common.dates import parse_datetime, to_iso_utc
from connectors.sap.exceptions import SapConfigError
from connectors.sap.odata import EntitySource, entity_path
from connectors.sap.routing import split_subject
from schemas.models import InferenceResult, ResultStatus
from schemas.rendering import readable

CORRELATION_PREFIX = "sap"


EdmType = Literal[
    "Edm.String",
    "Edm.Boolean",
    "Edm.Byte",
    "Edm.SByte",
    "Edm.Int16",
    "Edm.Int32",
    "Edm.Int64",
    "Edm.Decimal",
    "Edm.Double",
    "Edm.Single",
    "Edm.Guid",
    "Edm.DateTime",
    "Edm.DateTimeOffset",
]
_INTEGERS = frozenset({"Edm.Byte", "Edm.SByte", "Edm.Int16", "Edm.Int32", "Edm.Int64"})
_FLOATS = frozenset({"Edm.Decimal", "Edm.Double", "Edm.Single"})
_V2_SUFFIX = {"Edm.Int64": "L", "Edm.Decimal": "M", "Edm.Double": "d", "Edm.Single": "f"}
_TRUE = frozenset({"true", "x", "1"})
_FALSE = frozenset({"false", "", "0"})


class ActionParameter(BaseModel):
    """One function-import / action parameter: a template and its Edm type."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: str
    type: EdmType = "Edm.String"


class WriteCondition(BaseModel):
    """``only_if``: the output value must be below ``below`` and/or at least ``at_least``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    below: float | None = None
    at_least: float | None = None

    @model_validator(mode="after")
    def _some_bound(self) -> WriteCondition:
        if self.below is None and self.at_least is None:
            raise ValueError("only_if needs below and/or at_least")
        return self

    def holds(self, value: float) -> bool:
        if self.below is not None and not value < self.below:
            return False
        return self.at_least is None or value >= self.at_least


class WritebackSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["patch", "action"] = "patch"
    output: str = "score"
    fields: dict[str, str] = Field(default_factory=dict)
    marker_field: str | None = None
    action: str | None = None
    parameters: dict[str, str | ActionParameter] = Field(default_factory=dict)
    only_if: WriteCondition | None = None

    def typed_parameters(self) -> dict[str, ActionParameter]:
        return {
            name: spec if isinstance(spec, ActionParameter) else ActionParameter(value=spec)
            for name, spec in self.parameters.items()
        }

    @model_validator(mode="after")
    def _complete(self) -> WritebackSpec:
        if self.method == "patch" and not self.fields:
            raise ValueError("method patch needs fields to write")
        if self.method == "action" and not self.action:
            raise ValueError("method action needs the action's name")
        if self.marker_field is not None and self.marker_field not in self.fields:
            raise ValueError("marker_field must be one of the written fields")
        return self

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> WritebackSpec:
        try:
            return cls.model_validate(dict(section))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "(section)"
            raise SapConfigError(f"mapping writeback.{where}: {first['msg']}") from None


def signer(connector: str, secrets: tuple[bytes, ...]) -> CorrelationSigner:
    """The signer of this connector's correlation ids."""
    return CorrelationSigner(CORRELATION_PREFIX, connector, secrets)


def correlation_id(signer: CorrelationSigner, predicate: str, request_id: UUID | str) -> str:
    """The request's correlation id: which connector made it, which entity it is about, and
    for which request, signed."""
    return signer.sign(predicate, request_id)


def entity_of(signer: CorrelationSigner, result: InferenceResult) -> tuple[str, str] | Rejected:
    """``(route name, key predicate)`` of a result this connector asked for, or why it is not
    written: ``not_ours`` (another connector's or a plain request's) or a forgery's reason.
    The route name is empty for a one-mapping connector (``--mapping``)."""
    checked = signer.verify(result.correlation_id, result.request_id)
    if isinstance(checked, Rejected):
        return checked
    assert isinstance(checked, Verified)
    named = split_subject(checked.subject)
    return Rejected("not_a_predicate") if named is None else named


def predicate_of(signer: CorrelationSigner, result: InferenceResult) -> str | Rejected:
    """The key predicate of a result of a one-mapping connector (route name empty)."""
    named = entity_of(signer, result)
    if isinstance(named, Rejected):
        return named
    route_name, predicate = named
    return Rejected("not_a_predicate") if route_name else predicate


def output_value(result: InferenceResult, output: str) -> float | None:
    """The first value of the named output tensor, or ``None`` when the result lacks it."""
    outputs = readable(result).get("outputs")
    if not isinstance(outputs, dict) or output not in outputs:
        return None
    value: Any = outputs[output]
    while isinstance(value, list):
        if not value:
            return None
        value = value[0]
    return float(value) if isinstance(value, int | float) else None


def predicate_parts(predicate: str) -> list[str]:
    """``Key='a,b'`` pairs of a key predicate, split at commas outside quoted literals."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in predicate.removeprefix("(").removesuffix(")"):
        if char == "'":
            quoted = not quoted  # a doubled quote toggles twice and stays inside
        if char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part for part in parts if part]


@dataclass(frozen=True)
class WritebackCall:
    """One HTTP call that writes a result back."""

    method: Literal["PATCH", "MERGE", "POST"]
    path: str
    body: dict[str, Any] | None
    entity_path: str
    """The entity's own path: read for its ETag (and marker) before a PATCH/MERGE."""
    marker: tuple[str, str] | None = None
    """(field, value) that shows this result was already written."""


@dataclass(frozen=True)
class Skip:
    """A result that is not written back, and why (counted, logged)."""

    reason: str


def plan_writeback(
    result: InferenceResult,
    *,
    predicate: str,
    source: EntitySource,
    spec: WritebackSpec,
) -> WritebackCall | Skip:
    """The call that writes ``result`` to the entity named by ``predicate``."""
    if result.status is not ResultStatus.OK:
        return Skip(f"status_{result.status.value}")
    score = output_value(result, spec.output)
    if score is None:
        return Skip("no_output")
    if spec.only_if is not None and not spec.only_if.holds(score):
        return Skip("condition_not_met")
    values = {
        "score": score,
        "request_id": str(result.request_id),
        "model": result.model,
        "model_version": result.model_version or "",
    }
    path = entity_path(source, predicate)
    if spec.method == "patch":
        body = {name: template.format_map(values) for name, template in spec.fields.items()}
        marker = None if spec.marker_field is None else (spec.marker_field, body[spec.marker_field])
        return WritebackCall(
            method="PATCH" if source.odata_version == 4 else "MERGE",
            path=path,
            body=body,
            entity_path=path,
            marker=marker,
        )
    assert spec.action is not None  # the spec's validator guarantees it
    try:
        typed = {
            name: (parameter.type, parameter.value.format_map(values))
            for name, parameter in spec.typed_parameters().items()
        }
        if source.odata_version == 4:
            # A bound action: POST <entity>/<action> with its parameters as a JSON object.
            body = {name: json_value(text, kind) for name, (kind, text) in typed.items()}
            return WritebackCall("POST", f"{path}/{spec.action}", body, path)
        # A v2 function import: keys and parameters as URL literals, no body.
        query = predicate_parts(predicate) + [
            f"{name}={uri_literal(text, kind)}" for name, (kind, text) in typed.items()
        ]
    except ValueError:
        return Skip("invalid_parameter")
    encoded = "&".join(quote(part, safe="=',") for part in query)
    return WritebackCall(
        "POST", f"{source.service.rstrip('/')}/{spec.action}?{encoded}", None, path
    )


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean")


def _number(text: str, kind: str) -> int | Decimal:
    """The value as a number of its Edm type; ``ValueError`` when it is not one."""
    if kind in _INTEGERS:
        return int(text.strip())
    try:
        number = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a number") from None
    if not number.is_finite():
        raise ValueError(f"{text!r} is not a finite number")
    return number


def uri_literal(text: str, kind: str) -> str:
    """``text`` as an OData V2 URI literal of Edm type ``kind`` (a function import's
    parameter). ``ValueError`` when the text is no value of that type."""
    if kind == "Edm.String":
        return "'" + text.replace("'", "''") + "'"
    if kind == "Edm.Boolean":
        return "true" if _boolean(text) else "false"
    if kind in _INTEGERS or kind in _FLOATS:
        return f"{_number(text, kind)}{_V2_SUFFIX.get(kind, '')}"
    if kind == "Edm.Guid":
        return f"guid'{UUID(text.strip())}'"
    if kind in ("Edm.DateTime", "Edm.DateTimeOffset"):
        moment = parse_datetime(text.strip())
        if kind == "Edm.DateTime":
            return "datetime'" + to_iso_utc(moment).removesuffix("Z") + "'"
        return "datetimeoffset'" + to_iso_utc(moment) + "'"
    raise ValueError(f"unsupported parameter type {kind!r}")


def json_value(text: str, kind: str) -> Any:
    """``text`` as the JSON value of Edm type ``kind`` (a v4 action's body)."""
    if kind == "Edm.Boolean":
        return _boolean(text)
    if kind in _INTEGERS:
        return _number(text, kind)
    if kind in _FLOATS:
        return float(_number(text, kind))
    if kind == "Edm.Guid":
        return str(UUID(text.strip()))
    if kind in ("Edm.DateTime", "Edm.DateTimeOffset"):
        return to_iso_utc(parse_datetime(text.strip()))
    return text
