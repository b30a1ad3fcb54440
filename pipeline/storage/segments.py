"""Result segments: one JSONL object per micro-batch, addressed by content.

A segment's key is derived from the request ids it holds, so a retried write of the same
batch overwrites the same object with the same bytes. Each record's byte offset and length
travel in its result event, so a caller fetches its own record with one ranged GET.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import orjson


@dataclass(frozen=True)
class RecordSpan:
    """Where one record lives inside its segment."""

    offset: int
    length: int


@dataclass(frozen=True)
class Segment:
    key: str
    body: bytes
    spans: tuple[RecordSpan, ...]


def segment_key(model: str, version: str, request_ids: Sequence[str], at: datetime) -> str:
    """Return ``<model>/<version>/<yyyy>/<mm>/<dd>/<digest>.jsonl`` for these request ids.

    Model and version are escaped into one path segment each: a version comes from a
    request, and must never climb out of its folder (``1/../x``) or break the key.
    """
    digest = hashlib.sha256("\n".join(request_ids).encode()).hexdigest()[:32]
    return f"{path_segment(model)}/{path_segment(version)}/{at:%Y/%m/%d}/{digest}.jsonl"


def path_segment(text: str) -> str:
    """``text`` as one safe object-key segment: percent-escaped, never ``.`` or ``..``."""
    escaped = quote(text, safe="-_.~")
    return escaped if escaped not in ("", ".", "..") else escaped.replace(".", "%2E") or "%00"


def build_segment(
    model: str,
    version: str,
    records: Sequence[Mapping[str, Any]],
    request_ids: Sequence[str],
    at: datetime,
) -> Segment:
    """Serialise ``records`` as JSONL and note each record's span (newline excluded)."""
    if len(records) != len(request_ids):
        raise ValueError(f"{len(records)} records but {len(request_ids)} request ids")
    if not records:
        raise ValueError("a segment holds at least one record")
    parts: list[bytes] = []
    spans: list[RecordSpan] = []
    offset = 0
    for record in records:
        # Sorted keys: a retried write of the same batch must produce the same bytes.
        line = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
        spans.append(RecordSpan(offset, len(line)))
        parts.append(line + b"\n")
        offset += len(line) + 1
    return Segment(segment_key(model, version, request_ids, at), b"".join(parts), tuple(spans))
