"""The local schema catalog: current schemas, every released version, fingerprints.

Layout under the catalog root (the ``schemas`` package directory by default)::

    avro/<Name>.avsc              the current schema of each event (what writers use)
    history/<Name>/<n>.avsc       released version n (1, 2, ...), never edited once released

A record written by any released version (or the current one) can be decoded: the
single-object header names its writer schema by fingerprint, and the catalog finds it.
Fingerprints are CRC-64-AVRO (Rabin) of the schema's Parsing Canonical Form, as the Avro
specification defines them; the canonical form drops docs, defaults and aliases, so a change
to those alone keeps the fingerprint (and the wire bytes) unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from fastavro import parse_schema
from fastavro.schema import to_parsing_canonical_form

from schemas.exceptions import CatalogError

PACKAGE_ROOT = Path(__file__).resolve().parent
"""Default catalog root: the installed ``schemas`` package (editable installs: the repo)."""

_EMPTY64 = 0xC15D213AA4D7A795  # the Avro specification's CRC-64-AVRO seed and polynomial


def _rabin_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY64 & -(fp & 1))
        table.append(fp)
    return tuple(table)


_TABLE = _rabin_table()


def fingerprint64(data: bytes) -> int:
    """CRC-64-AVRO (Rabin) fingerprint of ``data``, as an unsigned 64-bit integer."""
    fp = _EMPTY64
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


@dataclass(frozen=True, eq=False)
class SchemaVersion:
    """One version of one event schema, parsed and fingerprinted."""

    full_name: str
    """``io.sluiceway.v1.InferenceRequest``."""
    version: int | None
    """Released version number, or None for a current schema that is not released yet."""
    raw: dict[str, Any] = field(repr=False)
    """The JSON as written in the file (docs, defaults, aliases kept)."""
    parsed: dict[str, Any] = field(repr=False)
    """fastavro's parsed form, ready for schemaless_reader/writer."""
    canonical: str = field(repr=False)
    fingerprint: int
    path: Path

    @property
    def short_name(self) -> str:
        return self.full_name.rsplit(".", 1)[-1]

    @property
    def fingerprint_bytes(self) -> bytes:
        """The fingerprint as the single-object header carries it: 8 bytes, little-endian."""
        return self.fingerprint.to_bytes(8, "little")

    @property
    def json(self) -> str:
        """Compact JSON of the full schema (what is registered with a schema registry)."""
        return json.dumps(self.raw, separators=(",", ":"))


def parse_record_schema(raw: Any) -> dict[str, Any]:
    """fastavro's parsed form of a record schema (parses a copy: fastavro annotates its input)."""
    parsed = parse_schema(json.loads(json.dumps(raw)))
    if not isinstance(parsed, dict):
        raise CatalogError("an event schema must be a named record")
    return parsed


def load_schema_file(path: Path, version: int | None) -> SchemaVersion:
    """Read, parse and fingerprint one ``.avsc`` file; any problem is a :class:`CatalogError`."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CatalogError(f"{path}: cannot read schema: {exc}") from exc
    return schema_version_from_json(raw, version, path)


def schema_version_from_json(raw: Any, version: int | None, path: Path) -> SchemaVersion:
    """Parse and fingerprint a schema given as JSON data."""
    if not isinstance(raw, dict) or raw.get("type") != "record" or "name" not in raw:
        raise CatalogError(f"{path}: an event schema must be a named record")
    try:
        parsed = parse_record_schema(raw)
        canonical = to_parsing_canonical_form(json.loads(json.dumps(raw)))
    except CatalogError:
        raise
    except Exception as exc:  # fastavro raises several unrelated types for a bad schema
        raise CatalogError(f"{path}: invalid Avro schema: {exc}") from exc
    full_name = str(parsed["name"])
    return SchemaVersion(
        full_name=full_name,
        version=version,
        raw=raw,
        parsed=parsed,
        canonical=canonical,
        fingerprint=fingerprint64(canonical.encode("utf-8")),
        path=path,
    )


_VERSION_FILE = re.compile(r"^([1-9][0-9]*)\.avsc$")


class Catalog:
    """Every event schema: current versions, released versions, lookup by fingerprint.

    Invariants checked on load: a current file ``avro/X.avsc`` defines record ``X``; history
    folder ``history/X`` holds versions of record ``X`` named ``1.avsc, 2.avsc, ...`` without
    gaps; two different schemas never share a fingerprint.
    """

    def __init__(self, root: Path = PACKAGE_ROOT) -> None:
        self.root = root
        self._current: dict[str, SchemaVersion] = {}
        self._releases: dict[str, list[SchemaVersion]] = {}
        self._by_fingerprint: dict[int, SchemaVersion] = {}
        self._load()

    # -- loading

    def _load(self) -> None:
        avro_dir = self.root / "avro"
        if not avro_dir.is_dir():
            raise CatalogError(f"{avro_dir}: no such schema folder")
        for path in sorted(avro_dir.glob("*.avsc")):
            entry = load_schema_file(path, None)
            if entry.short_name != path.stem:
                raise CatalogError(f"{path}: defines {entry.full_name}, expected {path.stem}")
            self._current[entry.full_name] = entry
        history = self.root / "history"
        folders = sorted(p for p in history.iterdir() if p.is_dir()) if history.is_dir() else []
        for folder in folders:
            releases: list[SchemaVersion] = []
            for path in folder.glob("*.avsc"):
                match = _VERSION_FILE.match(path.name)
                if match is None:
                    raise CatalogError(f"{path}: history files are named <version>.avsc")
                entry = load_schema_file(path, int(match.group(1)))
                if entry.short_name != folder.name:
                    raise CatalogError(f"{path}: defines {entry.full_name}, expected {folder.name}")
                releases.append(entry)
            releases.sort(key=lambda e: e.version or 0)
            if [e.version for e in releases] != list(range(1, len(releases) + 1)):
                raise CatalogError(f"{folder}: versions must be 1..n without gaps")
            if releases:
                self._releases[releases[0].full_name] = releases
        # Register releases first so that an unchanged current schema resolves to its release.
        for releases in self._releases.values():
            for entry in releases:
                self._register(entry)
        for name, entry in list(self._current.items()):
            last = self.latest_release(name)
            if last is not None and last.canonical == entry.canonical:
                self._current[name] = last  # same wire schema: the current one *is* released
                continue
            self._register(entry)

    def _register(self, entry: SchemaVersion) -> None:
        other = self._by_fingerprint.get(entry.fingerprint)
        if other is not None and other.canonical != entry.canonical:
            raise CatalogError(
                f"{entry.path} and {other.path} share fingerprint {entry.fingerprint:016x}"
            )
        if other is None:
            self._by_fingerprint[entry.fingerprint] = entry

    # -- queries

    def names(self) -> list[str]:
        """Full names of every current event schema, sorted."""
        return sorted(self._current)

    def _full(self, name: str) -> str:
        if name in self._current or name in self._releases:
            return name
        for full in (*self._current, *self._releases):
            if full.rsplit(".", 1)[-1] == name:
                return full
        raise CatalogError(f"unknown schema {name!r}")

    def current(self, name: str) -> SchemaVersion:
        """The current schema of event ``name`` (full or short name)."""
        full = self._full(name)
        try:
            return self._current[full]
        except KeyError:
            raise CatalogError(f"schema {name!r} has releases but no current file") from None

    def releases(self, name: str) -> list[SchemaVersion]:
        """Released versions of ``name``, oldest first (empty if never released)."""
        return list(self._releases.get(self._full(name), []))

    def latest_release(self, name: str) -> SchemaVersion | None:
        releases = self._releases.get(self._full(name))
        return releases[-1] if releases else None

    def by_fingerprint(self, fingerprint: int) -> SchemaVersion | None:
        """The schema (released or current) with this fingerprint, if any."""
        return self._by_fingerprint.get(fingerprint)

    def by_canonical(self, canonical: str) -> SchemaVersion | None:
        entry = self._by_fingerprint.get(fingerprint64(canonical.encode("utf-8")))
        return entry if entry is not None and entry.canonical == canonical else None

    def is_released(self, name: str) -> bool:
        """True when the current schema equals (canonically) its latest release."""
        return self.current(name).version is not None

    def release(self, name: str) -> SchemaVersion:
        """Copy the current schema file into history as the next version; return that entry.

        Refuses (:class:`CatalogError`) when the current schema is already released. The
        caller checks compatibility first (``sluiceway schemas release`` does).
        """
        current = self.current(name)
        if current.version is not None:
            raise CatalogError(f"{current.short_name} is unchanged since version {current.version}")
        last = self.latest_release(name)
        version = 1 if last is None else (last.version or 0) + 1
        target = self.root / "history" / current.short_name / f"{version}.avsc"
        target.parent.mkdir(parents=True, exist_ok=True)
        # Copy bytes verbatim: a release is exactly the file that was reviewed.
        with target.open("xb") as out:
            out.write(current.path.read_bytes())
        return load_schema_file(target, version)


@cache
def default_catalog() -> Catalog:
    """The catalog shipped in the ``schemas`` package, loaded once per process."""
    return Catalog(PACKAGE_ROOT)
