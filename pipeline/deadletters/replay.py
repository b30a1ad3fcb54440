"""The replay plan: which letters go back to which topic with which bytes, and which cannot.

A replayed letter is its original record sent again: the same key, value and headers, so
the request keeps its ``request_id`` (an idempotent consumer or a connector sees the same
request, not a new one). With a pinned version the request is decoded, its
``model_version`` set and encoded again; nothing else of it changes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import schemas
from pipeline.deadletters.letters import LetterId, StoredLetter
from schemas.models import InferenceRequest

REPLAYED_FROM_HEADER = "sluiceway-replayed-from"
"""Added to a replayed record: ``<dlq topic>:<partition>:<offset>`` of the letter it came from."""


@dataclass(frozen=True, slots=True)
class Resend:
    """One original to send back."""

    at: LetterId
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes | None], ...]
    request_id: str | None


@dataclass(frozen=True, slots=True)
class Skipped:
    """A selected letter that cannot be replayed, and why."""

    at: LetterId
    why: str


def plan_replay(
    letters: Iterable[StoredLetter],
    *,
    dlq_topic: str,
    allowed_topics: Collection[str],
    original: Callable[[StoredLetter], bytes],
    pinned_version: str | None = None,
) -> tuple[list[Resend], list[Skipped]]:
    """Resends for ``letters`` whose original can be had (``original`` fetches and opens it;
    whatever it raises skips that letter) and whose original topic is one of
    ``allowed_topics`` (the model's own request topics: a letter's fields are data, and
    must not choose where the tool writes)."""
    resends: list[Resend] = []
    skipped: list[Skipped] = []
    for stored in letters:
        outcome = _plan_one(stored, dlq_topic, allowed_topics, original, pinned_version)
        if isinstance(outcome, Resend):
            resends.append(outcome)
        else:
            skipped.append(outcome)
    return resends, skipped


def _plan_one(
    stored: StoredLetter,
    dlq_topic: str,
    allowed_topics: Collection[str],
    original: Callable[[StoredLetter], bytes],
    pinned_version: str | None,
) -> Resend | Skipped:
    letter = stored.letter
    if letter is None:
        return Skipped(stored.at, f"not a readable dead letter ({stored.problem})")
    if letter.original_topic.startswith("connector:"):
        return Skipped(
            stored.at, "a connector letter: its original is a source record; fix it at the source"
        )
    if letter.original_topic not in allowed_topics:
        topic = letter.original_topic[:80]
        return Skipped(stored.at, f"original topic {topic!r} is not this model's")
    try:
        value = original(stored)
    except Exception as error:  # any way of not getting it back only skips this letter
        return Skipped(stored.at, f"original not available: {str(error)[:200]}")
    request_id = letter.request_id or _request_id_of(value)
    if pinned_version is not None:
        try:
            request = schemas.decode(value, InferenceRequest)
        except Exception as error:
            return Skipped(stored.at, f"original is no request to pin: {type(error).__name__}")
        value = schemas.encode(request.model_copy(update={"model_version": pinned_version}))
        request_id = str(request.request_id)
    kept = tuple(
        (h.key, h.value) for h in letter.original_headers or () if h.key != REPLAYED_FROM_HEADER
    )
    source = f"{dlq_topic}:{stored.at}".encode()
    return Resend(
        stored.at,
        letter.original_topic,
        letter.original_key,
        value,
        (*kept, (REPLAYED_FROM_HEADER, source)),
        request_id,
    )


def _request_id_of(value: bytes) -> str | None:
    """The id of the request in ``value``, where it is one (a letter written before the
    request was decoded, e.g. ``too_large``, does not name it)."""
    try:
        return str(schemas.decode(value, InferenceRequest).request_id)
    except Exception:
        return None
