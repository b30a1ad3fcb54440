"""Example input files for the demo model: synthetic supplier invoices, in any input format.

Written in chunks, so a file of millions of records costs no more memory than one chunk.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro

from devkit.modeling.invoices import FEATURES, generate
from schemas.models import BatchInputFormat

_CHUNK = 50_000
# Every input but the amount is a count, a number of days or a 0/1 flag.
_INTEGER_FEATURES = frozenset(FEATURES) - {"amount_eur"}


def invoice_records(rows: int, seed: int = 11, explain_every: int = 0) -> Iterator[dict[str, Any]]:
    """``rows`` records with ``custom_id`` ``inv-0000001``..., every ``explain_every``-th
    asking for an explanation (0: none)."""
    written = 0
    chunk_seed = seed
    while written < rows:
        size = min(_CHUNK, rows - written)
        data = generate(size, chunk_seed)
        chunk_seed += 1
        for row in data.x:
            written += 1
            record: dict[str, Any] = {"custom_id": f"inv-{written:07d}"}
            for name, value in zip(FEATURES, row, strict=True):
                record[name] = int(value) if name in _INTEGER_FEATURES else round(float(value), 2)
            record["explain"] = bool(explain_every) and written % explain_every == 0
            yield record


def write_example(
    path: Path, rows: int, input_format: BatchInputFormat, *, seed: int = 11, explain_every: int = 0
) -> Path:
    records = invoice_records(rows, seed, explain_every)
    if input_format is BatchInputFormat.JSONL:
        with path.open("w") as out:
            for record in records:
                out.write(json.dumps(record) + "\n")
    elif input_format is BatchInputFormat.CSV:
        with path.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=["custom_id", *FEATURES, "explain"])
            writer.writeheader()
            writer.writerows(records)
    elif input_format is BatchInputFormat.PARQUET:
        _write_parquet(path, records)
    else:
        with path.open("wb") as out:
            fastavro.writer(out, fastavro.parse_schema(_avro_schema()), records)
    return path


def _write_parquet(path: Path, records: Iterator[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer: Any = None
    try:
        while True:
            chunk = [record for _, record in zip(range(_CHUNK), records, strict=False)]
            if not chunk:
                return
            table = pa.Table.from_pylist(chunk)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def _avro_schema() -> dict[str, Any]:
    fields: list[dict[str, Any]] = [{"name": "custom_id", "type": "string"}]
    for name in FEATURES:
        fields.append({"name": name, "type": "long" if name in _INTEGER_FEATURES else "double"})
    fields.append({"name": "explain", "type": "boolean"})
    return {"type": "record", "name": "Invoice", "namespace": "example", "fields": fields}
