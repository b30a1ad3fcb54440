"""Handled letters: a compacted topic beside each DLQ remembers which were replayed or purged.

A DLQ is append-only and the letters are evidence, so nothing is deleted from it. Instead
``<ns>.<model>.dlq.handled`` (compacted, one partition) holds one record per handled letter,
keyed ``<partition>:<offset>`` of the letter, whose JSON value says what was done, when, and
where it went. Compaction keeps the latest word on each letter for as long as the topic
lives; a tombstone (no value) makes a letter unhandled again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, cast

from pipeline.deadletters.letters import LetterId, letter_id_of

State = Literal["replayed", "purged"]
_STATES: frozenset[str] = frozenset({"replayed", "purged"})
MAX_MARKER_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Marker:
    state: State
    at: datetime
    target: str | None = None
    """Where a replayed letter's original went (its request topic)."""
    pinned_version: str | None = None


def marker_key(at: LetterId) -> bytes:
    return str(at).encode()


def encode_marker(marker: Marker) -> bytes:
    return json.dumps(
        {
            "state": marker.state,
            "at": marker.at.isoformat(),
            "target": marker.target,
            "pinned_version": marker.pinned_version,
        },
        separators=(",", ":"),
    ).encode()


def decode_marker(value: bytes) -> Marker | None:
    """The marker in ``value``; ``None`` for anything this module did not write."""
    if len(value) > MAX_MARKER_BYTES:
        return None
    try:
        data = json.loads(value)
        state = data["state"]
        at = datetime.fromisoformat(data["at"])
        target = data.get("target")
        version = data.get("pinned_version")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None
    if state not in _STATES or at.tzinfo is None:
        return None
    if not isinstance(target, str | None) or not isinstance(version, str | None):
        return None
    return Marker(cast(State, state), at, target, version)


def fold_markers(
    records: Iterable[tuple[bytes | None, bytes | None]],
) -> dict[LetterId, Marker]:
    """The handled letters after reading the topic's ``(key, value)`` records in order: the
    latest marker per letter wins, a tombstone clears it, junk is ignored."""
    handled: dict[LetterId, Marker] = {}
    for key, value in records:
        at = letter_id_of(key)
        if at is None:
            continue
        if value is None:
            handled.pop(at, None)
            continue
        marker = decode_marker(value)
        if marker is not None:
            handled[at] = marker
    return handled
