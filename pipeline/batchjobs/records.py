"""From an input record to what one inference request needs, or a typed reason why not.

A record is a flat object (a JSONL object, a CSV row, a Parquet or Avro row):

- ``custom_id``: the caller's id for the line; generated as ``line-<n>`` when absent.
- ``explain``: ask for an explanation of this record (default false).
- a feature model (Triton, ``feature_order`` set) takes every other field as a feature, or a
  nested ``features`` object; a text model (vLLM) takes ``prompt`` or ``messages``, and
  optional generation ``params``.

Pure: no I/O, so the same rules run at submission (to refuse a bad file before anything is
published) and in the runner (to build the requests).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pipeline.batchjobs.formats import SourceRecord
from pipeline.settings import ModelSettings
from schemas.errors import UnservableRecord
from schemas.limits import DEFAULT_LIMITS
from schemas.models import Inputs

CUSTOM_ID = "custom_id"
EXPLAIN = "explain"
_TEXT_FIELDS = ("prompt", "messages", "params")
_RESERVED = frozenset({CUSTOM_ID, EXPLAIN, "features", *_TEXT_FIELDS})
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no", ""})


@dataclass(frozen=True)
class BatchItem:
    """A valid record: everything its request needs besides the job's own fields."""

    line: int
    custom_id: str
    custom_id_generated: bool
    inputs: Inputs
    explain: bool


@dataclass(frozen=True)
class UnservableLine:
    """A record of the input that can never be served, and where it stands in the file.

    The refusal itself is an :class:`UnservableRecord`: its ``reason_code`` is the code the
    job's error file gives the line, its message names the field.
    """

    line: int
    custom_id: str | None
    refusal: UnservableRecord

    @classmethod
    def of(cls, line: int, custom_id: str | None, reason_code: str, message: str) -> UnservableLine:
        return cls(line, custom_id, UnservableRecord(reason_code, message))

    def describe(self) -> str:
        named = f" ({self.custom_id})" if self.custom_id else ""
        return f"line {self.line}{named}: {self.refusal.reason_code}: {self.refusal.message}"


def generated_custom_id(line: int) -> str:
    return f"line-{line}"


def custom_id_of(fields: dict[str, Any] | None, line: int) -> str:
    """The record's custom id as :meth:`RecordParser.parse` names it, without the other
    checks: valid, or ``line-<n>`` where there is none (or none that is valid)."""
    if fields is None:
        return generated_custom_id(line)
    custom_id, _, error = _custom_id(fields.get(CUSTOM_ID), line)
    return generated_custom_id(line) if error is not None else custom_id


class RecordParser:
    """Turns source records into :class:`BatchItem` or :class:`UnservableLine` for one model."""

    def __init__(
        self, model: ModelSettings, *, values_are_text: bool, max_record_bytes: int
    ) -> None:
        self.model = model
        self.values_are_text = values_are_text
        self.max_record_bytes = max_record_bytes

    def parse(self, source: SourceRecord) -> BatchItem | UnservableLine:
        line = source.line
        if source.fields is None:
            return UnservableLine.of(line, None, "unreadable", source.error or "unreadable record")
        fields = source.fields
        custom_id, generated, id_error = _custom_id(fields.get(CUSTOM_ID), line)
        if id_error is not None:
            return UnservableLine.of(line, None, "invalid_custom_id", id_error)
        if source.size > self.max_record_bytes:
            return UnservableLine.of(
                line,
                custom_id,
                "too_large",
                f"{source.size} bytes > max_record_bytes {self.max_record_bytes}",
            )
        explain = _flag(fields.get(EXPLAIN))
        if explain is None:
            return UnservableLine.of(
                line,
                custom_id,
                "invalid_field",
                f"explain must be true or false, not {fields[EXPLAIN]!r}",
            )
        try:
            raw_inputs = (
                self._text_inputs(fields)
                if self.model.backend == "vllm"
                else self._feature_inputs(fields)
            )
            inputs = Inputs.model_validate(raw_inputs)
        except UnservableRecord as refusal:
            return UnservableLine(line, custom_id, refusal)
        except ValidationError as exc:
            return UnservableLine.of(line, custom_id, "invalid_record", _summary(exc))
        return BatchItem(line, custom_id, generated, inputs, explain)

    def _feature_inputs(self, fields: dict[str, Any]) -> dict[str, Any]:
        nested = fields.get("features")
        if nested is not None and not isinstance(nested, dict):
            raise UnservableRecord("invalid_field", "features must be an object")
        features = (
            dict(nested)
            if nested is not None
            else {name: value for name, value in fields.items() if name not in _RESERVED}
        )
        if not self.model.feature_order:
            raise UnservableRecord("unsupported_input", "this model takes no feature records")
        for name in self.model.feature_order:
            features[name] = self._number(name, features.get(name))
        return {"features": features}

    def _number(self, name: str, value: Any) -> float | int:
        if value is None:
            raise UnservableRecord("missing_feature", f"feature {name!r} is missing")
        if isinstance(value, str) and self.values_are_text:
            try:
                value = float(value)
            except ValueError:
                raise UnservableRecord(
                    "invalid_feature", f"feature {name!r} must be a number, got {value!r}"
                ) from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UnservableRecord(
                "invalid_feature", f"feature {name!r} must be a number, got {value!r}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise UnservableRecord(
                "invalid_feature", f"feature {name!r} must be finite, got {value!r}"
            )
        return value

    def _text_inputs(self, fields: dict[str, Any]) -> dict[str, Any]:
        text = {name: fields[name] for name in _TEXT_FIELDS if fields.get(name) is not None}
        if "prompt" not in text and "messages" not in text:
            raise UnservableRecord("missing_field", "a text model needs a prompt or messages")
        for name in ("messages", "params"):
            if isinstance(text.get(name), str):
                # CSV and Parquet carry nested values as JSON text.
                try:
                    text[name] = json.loads(text[name])
                except json.JSONDecodeError as exc:
                    raise UnservableRecord(
                        "invalid_field", f"{name} is not valid JSON: {exc}"
                    ) from None
        return {"text": text}


def _custom_id(value: Any, line: int) -> tuple[str, bool, str | None]:
    if value is None:
        return generated_custom_id(line), True, None
    if isinstance(value, bool) or not isinstance(value, str | int):
        return "", False, f"custom_id must be a string, not {type(value).__name__}"
    text = str(value).strip()
    if not text:
        return "", False, "custom_id is empty"
    if len(text) > DEFAULT_LIMITS.max_name_length:
        return "", False, f"custom_id is longer than {DEFAULT_LIMITS.max_name_length} characters"
    return text, False, None


def _flag(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return None


def _summary(error: ValidationError) -> str:
    errors = error.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "record"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"
