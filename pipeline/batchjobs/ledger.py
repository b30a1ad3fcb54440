"""A job's ledger on local disk: which custom id sits at which position, and each outcome.

SQLite, so a job of millions of records costs disk, not memory, and the output files are
written in input order by one ordered scan. The ledger is a cache: the runner rebuilds it from
the input file and the results topic whenever it starts, so losing it loses nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    position INTEGER PRIMARY KEY,
    line INTEGER NOT NULL,
    custom_id TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS outcomes (
    position INTEGER PRIMARY KEY,
    ok INTEGER NOT NULL,
    body TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Duplicate:
    custom_id: str
    line: int
    first_line: int


@dataclass(frozen=True)
class LedgerRow:
    position: int
    custom_id: str
    ok: bool | None
    """None: no outcome recorded."""
    body: str | None


class Ledger:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        # A rebuildable cache: durability across power loss is not worth an fsync per write.
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.executescript(_SCHEMA)
        self._db.execute("BEGIN")
        self.items = 0
        self.ok = 0
        self.failed = 0

    @property
    def answered(self) -> int:
        return self.ok + self.failed

    def add_item(self, position: int, line: int, custom_id: str) -> Duplicate | None:
        """Record the custom id at ``position``, or say where it was seen first."""
        try:
            self._db.execute(
                "INSERT INTO items (position, line, custom_id) VALUES (?, ?, ?)",
                (position, line, custom_id),
            )
        except sqlite3.IntegrityError:
            first = self._db.execute(
                "SELECT line FROM items WHERE custom_id = ?", (custom_id,)
            ).fetchone()
            return Duplicate(custom_id, line, int(first[0]) if first else line)
        self.items += 1
        return None

    def record_by_position(self, position: int, *, ok: bool, body: str) -> bool:
        """Record an outcome; the first one for a position wins. True when it was new."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO outcomes (position, ok, body) VALUES (?, ?, ?)",
            (position, int(ok), body),
        )
        return self._count(cursor.rowcount, ok)

    def record_by_custom_id(self, custom_id: str, *, ok: bool, body: str) -> bool:
        """Record the outcome of the item with ``custom_id`` (unknown ids are ignored)."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO outcomes (position, ok, body) "
            "SELECT position, ?, ? FROM items WHERE custom_id = ?",
            (int(ok), body, custom_id),
        )
        return self._count(cursor.rowcount, ok)

    def _count(self, inserted: int, ok: bool) -> bool:
        if inserted <= 0:
            return False
        if ok:
            self.ok += 1
        else:
            self.failed += 1
        return True

    def rows(self) -> Iterator[LedgerRow]:
        """Every item in input order, with its outcome where there is one."""
        self.checkpoint()
        query = (
            "SELECT i.position, i.custom_id, o.ok, o.body FROM items i "
            "LEFT JOIN outcomes o ON o.position = i.position ORDER BY i.position"
        )
        for position, custom_id, ok, body in self._db.execute(query):
            yield LedgerRow(position, custom_id, None if ok is None else bool(ok), body)

    def checkpoint(self) -> None:
        """End the open write transaction (batched for speed) and start the next."""
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")

    def close(self) -> None:
        self._db.execute("COMMIT")
        self._db.close()
