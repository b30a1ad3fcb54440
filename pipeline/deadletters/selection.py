"""Which letters an operator means: by reason, failure time, position and count."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pipeline.deadletters.exceptions import SelectorError
from pipeline.deadletters.letters import LetterId, StoredLetter, letter_id_of
from pipeline.deadletters.markers import Marker

MAX_SELECTOR_CHARS = 256
"""No reason code, name or moment is longer (reason codes are Avro names of up to 256)."""
_RELATIVE = re.compile(r"(\d{1,6})([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_NAME = re.compile(r"[A-Za-z0-9_.<>-]+")


@dataclass(frozen=True)
class Selector:
    """Letters whose reason is one of ``reasons`` (all when empty), that last failed within
    ``[since, until)``, at ``at`` when given; handled ones only when ``include_handled``;
    at most ``limit`` of them, oldest first."""

    reasons: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None
    at: frozenset[LetterId] = frozenset()
    limit: int | None = None
    include_handled: bool = False

    def matches(self, stored: StoredLetter) -> bool:
        if self.reasons and stored.reason not in self.reasons:
            return False
        if self.at and stored.at not in self.at:
            return False
        if self.since is None and self.until is None:
            return True
        if stored.letter is None:
            return False  # a malformed record has no failure time to place it by
        failed = stored.letter.last_failure_at
        if self.since is not None and failed < self.since:
            return False
        return self.until is None or failed < self.until


def parse_name(text: str, what: str) -> str:
    """A reason code or model name as given on the command line."""
    if not text or len(text) > MAX_SELECTOR_CHARS or not _NAME.fullmatch(text):
        raise SelectorError(f"{what} {text[:40]!r} is not a name (letters, digits, _ . - only)")
    return text


def parse_moment(text: str, now: datetime) -> datetime:
    """``2026-12-01T10:00:00Z`` (ISO 8601; no zone means UTC) or a time ago: ``90s``,
    ``15m``, ``2h``, ``7d``."""
    if not text or len(text) > 64:
        raise SelectorError(f"time {text[:40]!r} is neither ISO 8601 nor like 15m, 2h, 7d")
    relative = _RELATIVE.fullmatch(text)
    if relative:
        return now - timedelta(**{_UNITS[relative.group(2)]: int(relative.group(1))})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise SelectorError(
            f"time {text[:40]!r} is neither ISO 8601 nor like 15m, 2h, 7d"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_position(text: str) -> LetterId:
    """``<partition>:<offset>``, as ``dlq list`` prints a letter."""
    found = letter_id_of(text)
    if found is None:
        raise SelectorError(f"letter {text[:40]!r} is not <partition>:<offset>")
    return found


def parse_selector(
    *,
    reasons: Sequence[str] = (),
    since: str | None = None,
    until: str | None = None,
    at: Sequence[str] = (),
    limit: int | None = None,
    include_handled: bool = False,
    now: datetime,
) -> Selector:
    """A :class:`Selector` from command-line text; raises :class:`SelectorError`."""
    start = None if since is None else parse_moment(since, now)
    end = None if until is None else parse_moment(until, now)
    if start is not None and end is not None and end <= start:
        raise SelectorError("--until must be later than --since")
    if limit is not None and limit < 1:
        raise SelectorError("--limit must be at least 1")
    return Selector(
        reasons=frozenset(parse_name(r, "reason") for r in reasons),
        since=start,
        until=end,
        at=frozenset(parse_position(p) for p in at),
        limit=limit,
        include_handled=include_handled,
    )


def select(
    letters: Iterable[StoredLetter], selector: Selector, handled: Mapping[LetterId, Marker]
) -> list[StoredLetter]:
    """The letters ``selector`` means, in topic order."""
    chosen = [
        stored
        for stored in sorted(letters, key=lambda s: (s.at.partition, s.at.offset))
        if selector.matches(stored) and (selector.include_handled or stored.at not in handled)
    ]
    return chosen if selector.limit is None else chosen[: selector.limit]


def count_by_reason(letters: Iterable[StoredLetter]) -> dict[str, int]:
    """Letters per reason, most frequent first."""
    return dict(Counter(stored.reason for stored in letters).most_common())
