"""Batch input files read as a stream of records, whatever their format.

Every reader yields one :class:`SourceRecord` per input record, in file order, holding at most
one record (or one Parquet row group's worth, for Parquet) in memory: a job of millions of
records is never loaded whole. A record that cannot be parsed is yielded with its error, not
raised, so validation reports every bad line with its number.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro

from schemas.errors import SluicewayError
from schemas.models import BatchInputFormat

_SUFFIXES = {
    ".jsonl": BatchInputFormat.JSONL,
    ".ndjson": BatchInputFormat.JSONL,
    ".csv": BatchInputFormat.CSV,
    ".parquet": BatchInputFormat.PARQUET,
    ".pq": BatchInputFormat.PARQUET,
    ".avro": BatchInputFormat.AVRO,
}
_PARQUET_ROWS_PER_READ = 4_096


class InputFormatError(SluicewayError):
    """The input as a whole cannot be read (unknown format, not a Parquet/Avro file)."""


@dataclass(frozen=True)
class SourceRecord:
    """One input record: where it is, its fields, or why it could not be read."""

    line: int
    """1-based line number for JSONL and CSV (the line a record ends on), row number for
    Parquet and Avro."""
    fields: dict[str, Any] | None
    error: str | None = None
    size: int = 0
    """Encoded size in bytes (the line for text formats, the row as JSON otherwise)."""


def detect_format(name: str) -> BatchInputFormat:
    suffix = Path(name.split("?", 1)[0]).suffix.lower()
    found = _SUFFIXES.get(suffix)
    if found is None:
        known = ", ".join(sorted(_SUFFIXES))
        raise InputFormatError(
            f"cannot tell the format of {name!r} ({suffix or 'no suffix'}); name one with "
            f"--format or use a known suffix: {known}"
        )
    return found


def read_records(path: Path, input_format: BatchInputFormat) -> Iterator[SourceRecord]:
    readers = {
        BatchInputFormat.JSONL: _read_jsonl,
        BatchInputFormat.CSV: _read_csv,
        BatchInputFormat.PARQUET: _read_parquet,
        BatchInputFormat.AVRO: _read_avro,
    }
    return readers[input_format](path)


def values_are_text(input_format: BatchInputFormat) -> bool:
    """CSV carries every value as text: numbers are parsed where the model wants numbers."""
    return input_format is BatchInputFormat.CSV


def _read_jsonl(path: Path) -> Iterator[SourceRecord]:
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue  # blank lines (a trailing newline, spacing) are not records
            try:
                value = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield SourceRecord(number, None, f"not valid JSON: {exc}", len(raw))
                continue
            if not isinstance(value, dict):
                kind = type(value).__name__
                yield SourceRecord(number, None, f"a record must be a JSON object, not {kind}")
                continue
            yield SourceRecord(number, value, size=len(raw))


def _read_csv(path: Path) -> Iterator[SourceRecord]:
    with path.open("r", encoding="utf-8", newline="") as text:
        reader = csv.reader(text)
        try:
            header = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as exc:
            raise InputFormatError(f"cannot read the CSV header: {exc}") from exc
        names = [name.strip() for name in header]
        if len(set(names)) != len(names) or "" in names:
            raise InputFormatError(f"CSV header has empty or repeated column names: {header}")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                yield SourceRecord(reader.line_num, None, f"not valid CSV: {exc}")
                continue
            if not row:
                continue
            size = sum(len(cell) + 1 for cell in row)
            if len(row) != len(names):
                yield SourceRecord(
                    reader.line_num,
                    None,
                    f"{len(row)} columns where the header names {len(names)}",
                    size,
                )
                continue
            # An empty cell is a missing value, not an empty string.
            fields = {
                name: (cell if cell != "" else None) for name, cell in zip(names, row, strict=True)
            }
            yield SourceRecord(reader.line_num, fields, size=size)


def _read_parquet(path: Path) -> Iterator[SourceRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputFormatError(f"not a readable Parquet file: {exc}") from exc
    number = 0
    with table:
        for batch in table.iter_batches(batch_size=_PARQUET_ROWS_PER_READ):
            for row in batch.to_pylist():
                number += 1
                yield SourceRecord(number, row, size=_json_size(row))


def _read_avro(path: Path) -> Iterator[SourceRecord]:
    with path.open("rb") as data:
        try:
            rows = fastavro.reader(data)
        except (ValueError, EOFError, fastavro.read.SchemaResolutionError) as exc:
            raise InputFormatError(f"not a readable Avro container file: {exc}") from exc
        number = 0
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except (ValueError, EOFError) as exc:
                raise InputFormatError(f"Avro file is damaged after row {number}: {exc}") from exc
            number += 1
            if not isinstance(row, dict):
                yield SourceRecord(number, None, "an Avro row must be a record")
                continue
            yield SourceRecord(number, row, size=_json_size(row))


def _json_size(row: dict[str, Any]) -> int:
    out = io.StringIO()
    json.dump(row, out, default=str)
    return len(out.getvalue())
