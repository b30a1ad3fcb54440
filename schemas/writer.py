"""Avro binary encoding compiled from a schema: one closure per schema node, built once.

fastavro's ``schemaless_writer`` interprets the schema for every datum. For the events the
worker produces once per request (an ``InferenceResult`` for every record served) that
interpretation cost more than all the worker's other per-record work together; a writer
compiled from the same parsed schema writes the same bytes in a fraction of the time.

Only the Avro constructs our event schemas use are compiled (every primitive, records, enums,
arrays, maps, fixed, unions, and the ``uuid`` and ``timestamp-millis`` logical types); a schema
with anything else is refused at compile time, so a new construct cannot be written wrongly.
``tests/unit/test_schemas_writer.py`` checks the output byte for byte against fastavro for
generated events of every type.

Union values follow fastavro's conventions: a ``(full_name, value)`` tuple names its branch;
otherwise the branch is chosen from the value's Python type, a dict going to the only record
branch (or a map branch when there is no record branch).
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

Write = Callable[[bytearray, Any], None]
"""Appends one datum's encoding to the buffer."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PACK_DOUBLE = struct.Struct("<d").pack
_PACK_FLOAT = struct.Struct("<f").pack
_NULL_INDEX_BYTE = 0  # zigzag(0)
_SECOND_BRANCH_BYTE = 2  # zigzag(1)


class SchemaCompileError(ValueError):
    """The schema uses an Avro construct this writer does not compile."""


def write_long(out: bytearray, value: int) -> None:
    """Zigzag varint, as Avro writes ``int`` and ``long``."""
    n = (value << 1) ^ (value >> 63)
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _write_string(out: bytearray, value: str) -> None:
    data = value.encode()
    write_long(out, len(data))
    out += data


def _write_bytes(out: bytearray, value: bytes) -> None:
    write_long(out, len(value))
    out += value


def _write_boolean(out: bytearray, value: bool) -> None:
    out.append(1 if value else 0)


def _write_null(out: bytearray, value: None) -> None:
    if value is not None:
        raise TypeError(f"{value!r} is not null")


def _write_double(out: bytearray, value: float) -> None:
    out += _PACK_DOUBLE(value)


def _write_float(out: bytearray, value: float) -> None:
    out += _PACK_FLOAT(value)


def _write_int(out: bytearray, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an integer")
    write_long(out, value)


def _write_uuid(out: bytearray, value: str | uuid.UUID) -> None:
    _write_string(out, value if isinstance(value, str) else str(value))


def _timestamp_millis(value: datetime | int) -> int:
    if not isinstance(value, datetime):
        return value
    if value.tzinfo is None:  # local time, as fastavro reads a naive datetime
        return int(time.mktime(value.timetuple())) * 1000 + value.microsecond // 1000
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _write_timestamp_millis(out: bytearray, value: datetime | int) -> None:
    write_long(out, _timestamp_millis(value))


_PRIMITIVES: dict[str, Write] = {
    "null": _write_null,
    "boolean": _write_boolean,
    "int": _write_int,
    "long": _write_int,
    "float": _write_float,
    "double": _write_double,
    "bytes": _write_bytes,
    "string": _write_string,
}
_LOGICAL: dict[tuple[str, str], Write] = {
    ("string", "uuid"): _write_uuid,
    ("long", "timestamp-millis"): _write_timestamp_millis,
}
# Python types a union branch of each Avro type takes, in fastavro's order of preference.
_BRANCH_TYPES: dict[str, tuple[type, ...]] = {
    "null": (type(None),),
    "boolean": (bool,),
    "int": (int,),
    "long": (int,),
    "float": (float, int),
    "double": (float, int),
    "bytes": (bytes, bytearray, memoryview),
    "string": (str,),
    "enum": (str,),
    "fixed": (bytes, bytearray, memoryview),
}


_STRING_SOURCE = [
    "b = x.encode()",
    "n = len(b)",
    "if n < 64:",
    "    out.append(n << 1)",
    "else:",
    "    write_long(out, n)",
    "out += b",
]
_PRIMITIVE_SOURCE: dict[str, list[str]] = {
    "string": _STRING_SOURCE,
    "long": [
        "if type(x) is not int:",
        "    raise TypeError(f'{x!r} is not an integer')",
        "if 0 <= x < 64:",
        "    out.append(x << 1)",
        "else:",
        "    write_long(out, x)",
    ],
    "boolean": ["out.append(1 if x else 0)"],
    "double": ["out += pack_double(x)"],
    "float": ["out += pack_float(x)"],
    "bytes": ["write_long(out, len(x))", "out += x"],
    "null": ["if x is not None:", "    raise TypeError(f'{x!r} is not null')"],
}
_PRIMITIVE_SOURCE["int"] = _PRIMITIVE_SOURCE["long"]
_GENERATED_HELPERS: dict[str, Any] = {
    "write_long": write_long,
    "timestamp_millis": _timestamp_millis,
    "pack_double": _PACK_DOUBLE,
    "pack_float": _PACK_FLOAT,
}


class _Compiler:
    def __init__(self) -> None:
        self.named: dict[str, Write] = {}
        self.kinds: dict[str, str] = {}

    def compile(self, schema: Any) -> Write:
        if isinstance(schema, str):
            if schema in _PRIMITIVES:
                return _PRIMITIVES[schema]
            return self._reference(schema)
        if isinstance(schema, list):
            return self._union(schema)
        kind = schema["type"]
        logical = schema.get("logicalType")
        if logical is not None:
            writer = _LOGICAL.get((kind, logical))
            if writer is None:
                raise SchemaCompileError(f"logical type {logical!r} on {kind!r}")
            return writer
        if kind in _PRIMITIVES:
            return _PRIMITIVES[kind]
        if kind == "record":
            return self._record(schema)
        if kind == "enum":
            return self._enum(schema)
        if kind == "array":
            return self._array(self.compile(schema["items"]))
        if kind == "map":
            return self._map(self.compile(schema["values"]))
        if kind == "fixed":
            return self._fixed(schema)
        raise SchemaCompileError(f"type {kind!r}")

    def _reference(self, name: str) -> Write:
        if name not in self.named:
            raise SchemaCompileError(f"unknown named type {name!r}")
        named = self.named

        def write_named(out: bytearray, value: Any) -> None:
            named[name](out, value)  # late bound: a record may refer to itself

        return write_named

    def _kind(self, branch: Any) -> str:
        if isinstance(branch, str):
            return branch if branch in _PRIMITIVES else self.kinds[branch]
        if isinstance(branch, list):
            raise SchemaCompileError("a union directly inside a union")
        return str(branch["type"])

    def _record(self, schema: Mapping[str, Any]) -> Write:
        """Generated source: one function per record, simple fields written inline.

        A call per field was most of the closure tree's cost; inlining the common shapes
        (strings, numbers, optional strings and numbers, enums) leaves calls only for nested
        records, arrays, maps and general unions.
        """
        name = str(schema["name"])
        cell: list[Write] = []
        self.named[name] = lambda out, value: cell[0](out, value)  # until generated: recursion
        self.kinds[name] = "record"
        namespace: dict[str, Any] = dict(_GENERATED_HELPERS)
        lines = ["def write_record(out, v):"]
        for field in schema["fields"]:
            lines.append(f"    x = v[{str(field['name'])!r}]")
            lines.extend("    " + line for line in self._field_source(field["type"], namespace))
        if len(lines) == 1:
            lines.append("    pass")
        exec(compile("\n".join(lines), f"<avro writer {name}>", "exec"), namespace)  # noqa: S102
        write_record: Write = namespace["write_record"]
        cell.append(write_record)
        self.named[name] = write_record
        return write_record

    def _field_source(self, schema: Any, namespace: dict[str, Any]) -> list[str]:
        """Lines writing the value in ``x``: inline for simple types, else a call."""
        inline = self._inline_source(schema, namespace)
        if inline is not None:
            return inline
        if (
            isinstance(schema, list)
            and len(schema) == 2
            and schema[0] == "null"
            and not isinstance(schema[1], list)
        ):
            branch = schema[1]
            inner = self._inline_source(branch, namespace) or [
                f"{self._bind(self.compile(branch), namespace)}(out, x)"
            ]
            unwrap = []
            if self._kind(branch) in {"record", "enum", "fixed"}:
                named = repr(_branch_name(branch))
                unwrap = [
                    f"    if type(x) is tuple and len(x) == 2 and x[0] == {named}:",
                    "        x = x[1]",
                ]
            return [
                "if x is None:",
                "    out.append(0)",
                "else:",
                "    out.append(2)",
                *unwrap,
                *("    " + line for line in inner),
            ]
        return [f"{self._bind(self.compile(schema), namespace)}(out, x)"]

    def _inline_source(self, schema: Any, namespace: dict[str, Any]) -> list[str] | None:
        kind = schema if isinstance(schema, str) else None
        if isinstance(schema, dict):
            logical = schema.get("logicalType")
            if logical == "uuid" and schema["type"] == "string":
                return ["if type(x) is not str:", "    x = str(x)", *_STRING_SOURCE]
            if logical == "timestamp-millis" and schema["type"] == "long":
                return ["write_long(out, timestamp_millis(x))"]
            if logical is not None:
                return None
            if schema["type"] == "enum":
                table = self._bind({s: i for i, s in enumerate(schema["symbols"])}, namespace)
                self._enum(schema)
                return [f"write_long(out, {table}[x])"]
            kind = schema["type"] if schema["type"] in _PRIMITIVES else None
        return None if kind is None else _PRIMITIVE_SOURCE.get(kind)

    @staticmethod
    def _bind(value: Any, namespace: dict[str, Any]) -> str:
        name = f"bound_{len(namespace)}"
        namespace[name] = value
        return name

    def _enum(self, schema: Mapping[str, Any]) -> Write:
        index = {symbol: position for position, symbol in enumerate(schema["symbols"])}

        def write_enum(out: bytearray, value: str) -> None:
            write_long(out, index[value])

        self.named[str(schema["name"])] = write_enum
        self.kinds[str(schema["name"])] = "enum"
        return write_enum

    def _fixed(self, schema: Mapping[str, Any]) -> Write:
        size = int(schema["size"])

        def write_fixed(out: bytearray, value: bytes) -> None:
            if len(value) != size:
                raise ValueError(f"fixed {schema['name']} takes {size} bytes, got {len(value)}")
            out += value

        self.named[str(schema["name"])] = write_fixed
        self.kinds[str(schema["name"])] = "fixed"
        return write_fixed

    @staticmethod
    def _array(write_item: Write) -> Write:
        def write_array(out: bytearray, value: Any) -> None:
            if value:
                write_long(out, len(value))
                for item in value:
                    write_item(out, item)
            out.append(0)

        return write_array

    @staticmethod
    def _map(write_value: Write) -> Write:
        def write_map(out: bytearray, value: Mapping[str, Any]) -> None:
            if value:
                write_long(out, len(value))
                for key, item in value.items():
                    _write_string(out, key)
                    write_value(out, item)
            out.append(0)

        return write_map

    def _union(self, branches: list[Any]) -> Write:
        writers = [self.compile(branch) for branch in branches]
        names = [_branch_name(branch) for branch in branches]
        if len(branches) == 2 and branches[0] == "null":
            return _nullable(writers[1], names[1])
        by_name = {name: (i, w) for i, (name, w) in enumerate(zip(names, writers, strict=True))}
        kinds = [self._kind(branch) for branch in branches]
        records = [i for i, kind in enumerate(kinds) if kind == "record"]

        def choose(value: Any) -> int:
            for i, kind in enumerate(kinds):
                python_types = _BRANCH_TYPES.get(kind)
                if python_types is None:
                    continue
                if kind in {"int", "long", "float", "double"} and isinstance(value, bool):
                    continue
                if isinstance(value, python_types):
                    return i
            if isinstance(value, Mapping):
                if len(records) == 1:
                    return records[0]
                maps = [i for i, kind in enumerate(kinds) if kind == "map"]
                if maps and not records:
                    return maps[0]
            if isinstance(value, list | tuple):
                arrays = [i for i, kind in enumerate(kinds) if kind == "array"]
                if arrays:
                    return arrays[0]
            raise TypeError(f"{type(value).__name__} fits no branch of {names}")

        def write_union(out: bytearray, value: Any) -> None:
            if type(value) is tuple and len(value) == 2 and value[0] in by_name:
                index, write = by_name[value[0]]
                write_long(out, index)
                write(out, value[1])
                return
            index = choose(value)
            write_long(out, index)
            writers[index](out, value)

        return write_union


def _nullable(write: Write, name: str) -> Write:
    """``["null", X]``, the union nearly every optional field is: no branch search."""

    def write_optional(out: bytearray, value: Any) -> None:
        if value is None:
            out.append(_NULL_INDEX_BYTE)
            return
        out.append(_SECOND_BRANCH_BYTE)
        if type(value) is tuple and len(value) == 2 and value[0] == name:
            value = value[1]
        write(out, value)

    return write_optional


def _branch_name(branch: Any) -> str:
    if isinstance(branch, str):
        return branch
    if isinstance(branch, dict) and "name" in branch:
        return str(branch["name"])
    return str(branch["type"]) if isinstance(branch, dict) else "union"


def compile_writer(parsed_schema: Mapping[str, Any] | str | list[Any]) -> Write:
    """A writer for ``parsed_schema`` (fastavro's parsed form: names fully qualified)."""
    return _Compiler().compile(parsed_schema)


def encoder(parsed_schema: Mapping[str, Any]) -> Callable[[Any], bytes]:
    """``datum -> bytes`` for ``parsed_schema``."""
    write = compile_writer(parsed_schema)

    def encode(datum: Any) -> bytes:
        out = bytearray()
        write(out, datum)
        return bytes(out)

    return encode
