"""Schema compatibility, decided by Avro's schema resolution rules. Pure: JSON in, findings out.

Two directions matter for a change from the last release (old) to the current schema (new):

* **backward**: the new reader reads data written with the old schema
  (consumers upgrade first; old messages still sit in the topic);
* **forward**: the old reader reads data written with the new schema
  (producers upgrade first; old consumers still run).

Sluiceway requires both (Confluent's ``FULL``), so producers and consumers deploy in any
order. The rules implemented (Avro specification, "Schema Resolution"): matching record
names (or a reader alias), reader fields missing from the writer need a default, writer
fields missing from the reader are skipped, promotions int->long->float->double and
string<->bytes, every writer enum symbol known to the reader unless the reader enum has a
default, every writer union branch readable by the reader, equal fixed sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
NAMED = frozenset({"record", "error", "enum", "fixed"})
PROMOTIONS = frozenset(
    {
        ("int", "long"),
        ("int", "float"),
        ("int", "double"),
        ("long", "float"),
        ("long", "double"),
        ("float", "double"),
        ("string", "bytes"),
        ("bytes", "string"),
    }
)
"""(writer type, reader type) pairs a reader accepts without an exact match."""

Direction = Literal["backward", "forward"]
_MISSING: Any = object()
NO_DEFAULT: Any = _MISSING
"""The ``default`` of a normalised field that has none in the schema."""


class Kind(StrEnum):
    """What kind of incompatibility was found."""

    FIELD_WITHOUT_DEFAULT = "field_without_default"
    TYPE_CHANGED = "type_changed"
    UNION_BRANCH = "union_branch"
    ENUM_SYMBOLS = "enum_symbols"
    NAME_CHANGED = "name_changed"
    FIXED_SIZE = "fixed_size"


@dataclass(frozen=True, slots=True)
class Incompatibility:
    """One reason the reader cannot read the writer's data."""

    path: str
    """Dotted field path from the top record (``inputs.features``); ``[]`` marks array items."""
    kind: Kind
    writer: str
    """The writer's type at ``path``, described (or the symbols/branch involved)."""
    reader: str
    """The reader's type at ``path``, described."""

    def explain(self, schema: str, direction: Direction) -> str:
        """One line in words, e.g. ``InferenceRequest: field 'tenant' added without a default:
        old data cannot be read (backward)``."""
        old, new = (
            (self.writer, self.reader) if direction == "backward" else (self.reader, self.writer)
        )
        what = f"field '{self.path}'" if self.path else "the record"
        if self.kind is Kind.FIELD_WITHOUT_DEFAULT:
            change = (
                f"{what} added without a default"
                if direction == "backward"
                else f"{what} removed, and the last release has no default for it"
            )
        elif self.kind is Kind.TYPE_CHANGED:
            change = f"{what} changed type from {old} to {new}"
        elif self.kind is Kind.UNION_BRANCH:
            change = (
                f"{what} no longer accepts {self.writer} (now {self.reader})"
                if direction == "backward"
                else f"{what} now accepts {self.writer}, "
                f"which the last release ({self.reader}) cannot read"
            )
        elif self.kind is Kind.ENUM_SYMBOLS:
            change = (
                f"{what} dropped enum symbol(s) {self.writer} and the new enum has no default"
                if direction == "backward"
                else f"{what} added enum symbol(s) {self.writer} "
                "and the last release's enum has no default"
            )
        elif self.kind is Kind.NAME_CHANGED:
            change = f"{what} renamed from {old} to {new} without an alias"
        else:
            change = f"{what} fixed size changed from {old} to {new}"
        consequence = (
            "old data cannot be read (backward)"
            if direction == "backward"
            else "new data cannot be read by old readers (forward)"
        )
        return f"{schema}: {change}: {consequence}"


# ----------------------------------------------------------------------------- normalising


def _full_name(name: str, namespace: str | None) -> tuple[str, str | None]:
    if "." in name:
        return name, name.rsplit(".", 1)[0]
    return (f"{namespace}.{name}" if namespace else name), namespace


def normalize(schema: Any) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Resolve namespaces: return the schema tree with full names, and its named types.

    Named types are dicts with ``name`` (full), ``aliases`` (full), and ``fields`` /
    ``symbols`` / ``size``; a reference to a named type is its full name as a string.
    """
    names: dict[str, dict[str, Any]] = {}

    def walk(node: Any, namespace: str | None) -> Any:
        if isinstance(node, str):
            if node in PRIMITIVES:
                return node
            full, _ = _full_name(node, namespace)
            return full if full in names or node not in names else node
        if isinstance(node, list):
            return [walk(branch, namespace) for branch in node]
        kind = node["type"]
        if isinstance(kind, dict | list):
            return walk(kind, namespace)
        if kind in NAMED:
            full, own_ns = _full_name(node["name"], node.get("namespace", namespace))
            out: dict[str, Any] = {
                "type": "record" if kind == "error" else kind,
                "name": full,
                "aliases": [_full_name(a, own_ns)[0] for a in node.get("aliases", [])],
            }
            names[full] = out  # before the fields: a record may refer to itself
            if kind in ("record", "error"):
                out["fields"] = [
                    {
                        "name": f["name"],
                        "type": walk(f["type"], own_ns),
                        "default": f.get("default", _MISSING),
                        "aliases": list(f.get("aliases", [])),
                    }
                    for f in node["fields"]
                ]
            elif kind == "enum":
                out["symbols"] = list(node["symbols"])
                out["default"] = node.get("default")
            else:
                out["size"] = node["size"]
            return out
        if kind == "array":
            return {"type": "array", "items": walk(node["items"], namespace)}
        if kind == "map":
            return {"type": "map", "values": walk(node["values"], namespace)}
        return walk(kind, namespace)  # {"type": "long", "logicalType": ...}: the primitive

    return walk(schema, None), names


def _deref(node: Any, names: dict[str, dict[str, Any]]) -> Any:
    if isinstance(node, str) and node not in PRIMITIVES:
        return names[node]
    return node


def _type(node: Any) -> str:
    if isinstance(node, str):
        return node
    if isinstance(node, list):
        return "union"
    return str(node["type"])


def describe(node: Any, names: dict[str, dict[str, Any]] | None = None) -> str:
    """Short text for a type: ``string``, ``Tensor``, ``array<long>``, ``null|string``."""
    if isinstance(node, list):
        return "|".join(describe(b, names) for b in node)
    if isinstance(node, str):
        return node.rsplit(".", 1)[-1]
    kind = node["type"]
    if kind == "array":
        return f"array<{describe(node['items'], names)}>"
    if kind == "map":
        return f"map<{describe(node['values'], names)}>"
    return str(node["name"]).rsplit(".", 1)[-1]


# ----------------------------------------------------------------------------- checking


def _names_match(reader: dict[str, Any], writer: dict[str, Any]) -> bool:
    return bool(reader["name"] == writer["name"] or writer["name"] in reader["aliases"])


def _matches(reader: Any, writer: Any, rn: dict[str, Any], wn: dict[str, Any]) -> bool:
    """Whether a reader union branch is selected for this writer schema (spec: same type,
    same name for named types, or a promotion)."""
    reader, writer = _deref(reader, rn), _deref(writer, wn)
    rt, wt = _type(reader), _type(writer)
    if rt == wt:
        return rt not in NAMED or _names_match(reader, writer)
    return (wt, rt) in PROMOTIONS


def can_read(reader: Any, writer: Any) -> list[Incompatibility]:
    """Everything that stops ``reader`` from reading data written with ``writer`` (raw JSON)."""
    reader_tree, rn = normalize(reader)
    writer_tree, wn = normalize(writer)
    found: list[Incompatibility] = []
    _check(reader_tree, writer_tree, "", rn, wn, set(), found)
    return found


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _check(
    reader: Any,
    writer: Any,
    path: str,
    rn: dict[str, dict[str, Any]],
    wn: dict[str, dict[str, Any]],
    seen: set[tuple[str, str]],
    found: list[Incompatibility],
) -> None:
    reader, writer = _deref(reader, rn), _deref(writer, wn)
    if isinstance(writer, list):
        # Any branch may have been written, so every branch must be readable.
        for branch in writer:
            if isinstance(reader, list):
                match = next((b for b in reader if _matches(b, branch, rn, wn)), None)
                if match is None:
                    found.append(
                        Incompatibility(path, Kind.UNION_BRANCH, describe(branch), describe(reader))
                    )
                else:
                    _check(match, branch, path, rn, wn, seen, found)
            elif _matches(reader, branch, rn, wn):
                _check(reader, branch, path, rn, wn, seen, found)
            else:
                found.append(
                    Incompatibility(path, Kind.UNION_BRANCH, describe(branch), describe(reader))
                )
        return
    if isinstance(reader, list):
        match = next((b for b in reader if _matches(b, writer, rn, wn)), None)
        if match is None:
            found.append(
                Incompatibility(path, Kind.UNION_BRANCH, describe(writer), describe(reader))
            )
        else:
            _check(match, writer, path, rn, wn, seen, found)
        return
    rt, wt = _type(reader), _type(writer)
    if rt != wt:
        if (wt, rt) not in PROMOTIONS:
            found.append(
                Incompatibility(path, Kind.TYPE_CHANGED, describe(writer), describe(reader))
            )
        return
    if rt in PRIMITIVES:
        return
    if rt == "array":
        _check(reader["items"], writer["items"], f"{path}[]", rn, wn, seen, found)
        return
    if rt == "map":
        _check(reader["values"], writer["values"], f"{path}{{}}", rn, wn, seen, found)
        return
    if not _names_match(reader, writer):
        found.append(Incompatibility(path, Kind.NAME_CHANGED, describe(writer), describe(reader)))
        return
    if rt == "fixed":
        if reader["size"] != writer["size"]:
            found.append(
                Incompatibility(path, Kind.FIXED_SIZE, str(writer["size"]), str(reader["size"]))
            )
        return
    if rt == "enum":
        missing = [s for s in writer["symbols"] if s not in reader["symbols"]]
        if missing and reader["default"] is None:
            found.append(
                Incompatibility(path, Kind.ENUM_SYMBOLS, ", ".join(missing), describe(reader))
            )
        return
    key = (reader["name"], writer["name"])
    if key in seen:  # recursive records: each pair once
        return
    seen.add(key)
    by_name = {f["name"]: f for f in writer["fields"]}
    for field in reader["fields"]:
        source = by_name.get(field["name"]) or next(
            (by_name[a] for a in field["aliases"] if a in by_name), None
        )
        field_path = _join(path, field["name"])
        if source is not None:
            _check(field["type"], source["type"], field_path, rn, wn, seen, found)
        elif field["default"] is _MISSING:
            found.append(
                Incompatibility(
                    field_path, Kind.FIELD_WITHOUT_DEFAULT, "(absent)", describe(field["type"])
                )
            )


@dataclass(frozen=True, slots=True)
class Finding:
    """One incompatibility in one direction, with its sentence."""

    direction: Direction
    incompatibility: Incompatibility
    message: str


def check_change(schema: str, old: Any, new: Any) -> list[Finding]:
    """Both directions for a change of ``schema`` (its short name) from ``old`` to ``new``."""
    findings = [
        Finding("backward", inc, inc.explain(schema, "backward")) for inc in can_read(new, old)
    ]
    findings += [
        Finding("forward", inc, inc.explain(schema, "forward")) for inc in can_read(old, new)
    ]
    return findings


# ----------------------------------------------------------------------------- lint


def _default_fits(default: Any, node: Any, names: dict[str, dict[str, Any]]) -> bool:
    node = _deref(node, names)
    kind = _type(node)
    if kind == "union":
        return _default_fits(default, node[0], names)  # spec: the default is for branch 0
    checks: dict[str, Any] = {
        "null": lambda v: v is None,
        "boolean": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "long": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "double": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "string": lambda v: isinstance(v, str),
        "bytes": lambda v: isinstance(v, str),
        "fixed": lambda v: isinstance(v, str),
        "enum": lambda v: v in node["symbols"],
        "array": lambda v: (
            isinstance(v, list) and all(_default_fits(i, node["items"], names) for i in v)
        ),
        "map": lambda v: (
            isinstance(v, dict) and all(_default_fits(i, node["values"], names) for i in v.values())
        ),
    }
    if kind == "record":
        if not isinstance(default, dict):
            return False
        return all(
            _default_fits(default[f["name"]], f["type"], names)
            if f["name"] in default
            else f["default"] is not _MISSING
            for f in node["fields"]
        )
    return bool(checks[kind](default))


def lint(schema_name: str, schema: Any) -> list[str]:
    """Problems with one schema on its own: defaults that do not fit their field's type
    (for a union: its first branch, so an optional field is ``["null", T]`` with default
    null)."""
    _, names = normalize(schema)
    problems: list[str] = []
    for record in names.values():
        for field in record.get("fields", []):
            default = field["default"]
            if default is not _MISSING and not _default_fits(default, field["type"], names):
                problems.append(
                    f"{schema_name}: field '{describe(record)}.{field['name']}' has default "
                    f"{default!r}, which does not fit {describe(field['type'])} "
                    "(a union's default must fit its first branch)"
                )
    return problems
