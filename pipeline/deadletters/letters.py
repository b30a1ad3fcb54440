"""One record of a DLQ topic as the tools see it: decoded, or malformed and saying why."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import schemas
from schemas.models import DeadLetter

MALFORMED = "<malformed>"
"""The reason a record is counted under when it is no dead letter this project can read."""

RawHeaders = Mapping[str, bytes | str | None] | Sequence[tuple[str, bytes | str | None]] | None


@dataclass(frozen=True, slots=True)
class LetterId:
    """Where a letter lies in its DLQ topic: the one identity a letter has."""

    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.partition}:{self.offset}"


def letter_id_of(text: str | bytes | None) -> LetterId | None:
    """``<partition>:<offset>`` as a :class:`LetterId`; ``None`` for anything else."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if not text or len(text) > 31:
        return None
    partition, sep, offset = text.partition(":")
    if not (sep and partition.isdigit() and offset.isdigit() and partition.isascii()):
        return None
    if not offset.isascii() or int(partition) >= 2**31 or int(offset) >= 2**63:
        return None
    return LetterId(int(partition), int(offset))


@dataclass(frozen=True, slots=True)
class StoredLetter:
    """A DLQ record: its letter, or ``None`` with ``problem`` saying why it does not decode."""

    at: LetterId
    letter: DeadLetter | None
    headers: tuple[tuple[str, bytes | None], ...]
    problem: str | None = None

    @property
    def reason(self) -> str:
        return MALFORMED if self.letter is None else self.letter.reason_code


def plain_headers(raw: RawHeaders) -> tuple[tuple[str, bytes | None], ...]:
    """Headers as ``(name, bytes)`` pairs, whatever form the client gave them in."""
    pairs: Iterable[tuple[str, bytes | str | None]] = (
        raw.items() if isinstance(raw, Mapping) else raw or ()
    )
    return tuple(
        (str(name), value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value)
        for name, value in pairs
    )


def read_letter(
    partition: int, offset: int, value: bytes | None, headers: RawHeaders
) -> StoredLetter:
    """The letter at ``partition:offset``; never raises, whatever the record holds (anyone
    with write access to the topic can put anything there)."""
    at = LetterId(partition, offset)
    try:
        plain = plain_headers(headers)
    except Exception:
        plain = ()
    if not value:
        return StoredLetter(at, None, plain, "empty record")
    try:
        letter = schemas.decode(value, DeadLetter)
    except Exception as error:
        return StoredLetter(at, None, plain, f"{type(error).__name__}: {str(error)[:200]}")
    return StoredLetter(at, letter, plain)
