"""Avro binary decoding compiled from a schema: generated source per record, built once.

The counterpart of :mod:`schemas.writer` for the case the worker meets on every record: data
written with the very schema it is read with (no resolution). It returns what fastavro's
``schemaless_reader`` returns for the same bytes (records as dicts, unions as the branch's
value, ``uuid`` as :class:`uuid.UUID`, ``timestamp-millis`` as an aware UTC datetime), which
``tests/unit/test_schemas_reader.py`` checks for generated events of every type.

Hostile input gets the same treatment as in fastavro, which the codec's error mapping relies
on: a length or count larger than the bytes left raises :class:`EOFError` before anything is
allocated (every array item and map entry of our schemas takes at least one byte), a bad
union or enum index or an over-long varint raises :class:`ValueError`, bad UTF-8 raises
:class:`UnicodeDecodeError`. Reading data written with another schema is left to fastavro.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

Read = Callable[[bytes, int], tuple[Any, int]]
"""Reads one datum at a position; returns it and the position after it."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_VARINT_BYTES = 10


class ReaderCompileError(ValueError):
    """The schema uses an Avro construct this reader does not compile."""


def read_long_rest(data: bytes, p: int, first: int) -> tuple[int, int]:
    """The rest of a varint whose first byte (``first``, high bit set) was already read."""
    n = first & 0x7F
    shift = 7
    while True:
        if shift >= 7 * _MAX_VARINT_BYTES:
            raise ValueError("varint longer than 10 bytes")
        byte = data[p]
        p += 1
        n |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (n >> 1) ^ -(n & 1), p
        shift += 7


def _timestamp_millis(millis: int) -> datetime:
    return _EPOCH + timedelta(microseconds=millis * 1000)


_HELPERS: dict[str, Any] = {
    "read_long_rest": read_long_rest,
    "unpack_double": struct.Struct("<d").unpack_from,
    "unpack_float": struct.Struct("<f").unpack_from,
    "UUID": uuid.UUID,
    "timestamp_millis": _timestamp_millis,
}


def _long(target: str) -> list[str]:
    return [
        "b = data[p]",
        "p += 1",
        "if b < 128:",
        f"    {target} = (b >> 1) ^ -(b & 1)",
        "else:",
        f"    {target}, p = read_long_rest(data, p, b)",
    ]


def _sized(target: str) -> list[str]:
    """A length-prefixed run of bytes into ``target`` (still bytes)."""
    return [
        *_long("n"),
        "if n < 0:",
        "    raise ValueError('negative length')",
        "if n > len(data) - p:",
        "    raise EOFError(f'length {n} with {len(data) - p} bytes left')",
        f"{target} = data[p:p + n]",
        "p += n",
    ]


def _fixed_width(target: str, width: int, value: str, what: str) -> list[str]:
    """``width`` bytes at ``p``, read by the expression ``value``, into ``target``."""
    return [
        f"if p + {width} > len(data):",
        f"    raise EOFError('{what} ends early')",
        f"{target} = {value}",
        f"p += {width}",
    ]


class _Compiler:
    def __init__(self) -> None:
        self.readers: dict[str, Read] = {}
        self.namespace: dict[str, Any] = dict(_HELPERS)

    def _bind(self, value: Any) -> str:
        name = f"bound_{len(self.namespace)}"
        self.namespace[name] = value
        return name

    def compile(self, schema: Any) -> Read:
        if isinstance(schema, dict) and schema.get("type") == "record":
            return self._record(schema)
        return self._function(self._source(schema, "x", 0), "value")

    def _exec(self, source: list[str], function: str, label: str) -> Read:
        namespace = self.namespace
        exec(compile("\n".join(source), f"<avro reader {label}>", "exec"), namespace)  # noqa: S102
        reader: Read = namespace.pop(function)
        return reader

    def _record(self, schema: Mapping[str, Any]) -> Read:
        name = str(schema["name"])
        cell: list[Read] = []
        # Until its source exists, a record that refers to itself reads through this cell.
        self.readers[name] = lambda data, p: cell[0](data, p)
        lines = ["def read_record(data, p):"]
        fields: list[str] = []
        for index, field in enumerate(schema["fields"]):
            variable = f"f{index}"
            lines += ["    " + line for line in self._source(field["type"], variable, 1)]
            fields.append(f"{str(field['name'])!r}: {variable}")
        lines.append("    return {" + ", ".join(fields) + "}, p")
        reader = self._exec(lines, "read_record", name)
        cell.append(reader)
        self.readers[name] = reader
        return reader

    def _call(self, reader: Read, target: str) -> list[str]:
        return [f"{target}, p = {self._bind(reader)}(data, p)"]

    def _source(self, schema: Any, target: str, depth: int) -> list[str]:
        """Lines that read one datum of ``schema`` into ``target`` and advance ``p``."""
        if isinstance(schema, str):
            if schema in self.readers:
                return self._call(self.readers[schema], target)
            return self._primitive(schema, target)
        if isinstance(schema, list):
            return self._union(schema, target, depth)
        kind = schema["type"]
        logical = schema.get("logicalType")
        if logical == "uuid" and kind == "string":
            return [*self._primitive("string", target), f"{target} = UUID({target})"]
        if logical == "timestamp-millis" and kind == "long":
            return [*_long(target), f"{target} = timestamp_millis({target})"]
        if logical is not None:
            raise ReaderCompileError(f"logical type {logical!r} on {kind!r}")
        if kind == "record":
            return self._call(self._record(schema), target)
        if kind == "enum":
            name = str(schema["name"])
            symbols = self._bind(tuple(schema["symbols"]))
            self.readers[name] = self._function(self._enum(symbols, "x"), name)
            return self._enum(symbols, target)
        if kind == "fixed":
            name, size = str(schema["name"]), int(schema["size"])
            sliced = f"data[p:p + {size}]"
            self.readers[name] = self._function(_fixed_width("x", size, sliced, "fixed"), name)
            return _fixed_width(target, size, sliced, "fixed")
        if kind == "array":
            return self._blocks(
                target, depth, self._source(schema["items"], f"y{depth}", depth + 1)
            )
        if kind == "map":
            key = self._primitive("string", f"k{depth}")
            value = self._source(schema["values"], f"y{depth}", depth + 1)
            return self._blocks(target, depth, value, key)
        return self._primitive(kind, target)

    def _function(self, lines: list[str], label: str) -> Read:
        """A reader function from ``lines`` that read one datum into ``x``."""
        source = ["def read_value(data, p):", *("    " + line for line in lines), "    return x, p"]
        return self._exec(source, "read_value", label)

    @staticmethod
    def _enum(symbols: str, target: str) -> list[str]:
        return [
            *_long("i"),
            f"if not 0 <= i < len({symbols}):",
            "    raise ValueError(f'enum index {i} out of range')",
            f"{target} = {symbols}[i]",
        ]

    @staticmethod
    def _primitive(kind: str, target: str) -> list[str]:
        if kind == "null":
            return [f"{target} = None"]
        if kind == "boolean":
            return _fixed_width(target, 1, "data[p] == 1", "boolean")
        if kind in {"int", "long"}:
            return _long(target)
        if kind == "double":
            return _fixed_width(target, 8, "unpack_double(data, p)[0]", "number")
        if kind == "float":
            return _fixed_width(target, 4, "unpack_float(data, p)[0]", "number")
        if kind == "bytes":
            return _sized(target)
        if kind == "string":
            return [*_sized(target), f"{target} = {target}.decode()"]
        raise ReaderCompileError(f"type {kind!r}")

    def _union(self, branches: list[Any], target: str, depth: int) -> list[str]:
        lines = _long(f"u{depth}")
        for index, branch in enumerate(branches):
            keyword = "if" if index == 0 else "elif"
            lines.append(f"{keyword} u{depth} == {index}:")
            lines += ["    " + line for line in self._source(branch, target, depth + 1)]
        lines += ["else:", f"    raise ValueError(f'union index {{u{depth}}} out of range')"]
        return lines

    @staticmethod
    def _blocks(
        target: str, depth: int, item: list[str], key: list[str] | None = None
    ) -> list[str]:
        """Array or map blocks: a count (negative: a byte size follows), items, 0 to end."""
        count, collected = f"c{depth}", f"z{depth}"
        lines = [f"{collected} = {{}}" if key else f"{collected} = []", "while True:"]
        body = [
            *_long(count),
            f"if {count} == 0:",
            "    break",
            f"if {count} < 0:",
            f"    {count} = -{count}",
            *("    " + line for line in _long("n")),  # the block's byte size, not needed
            f"if {count} > len(data) - p:",
            f"    raise EOFError(f'{{{count}}} items with {{len(data) - p}} bytes left')",
            f"for _ in range({count}):",
            *("    " + line for line in (key or [])),
            *("    " + line for line in item),
            f"    {collected}[k{depth}] = y{depth}" if key else f"    {collected}.append(y{depth})",
        ]
        lines += ["    " + line for line in body]
        lines.append(f"{target} = {collected}")
        return lines


def compile_reader(parsed_schema: Mapping[str, Any] | str | list[Any]) -> Read:
    """A reader for data written with ``parsed_schema`` (fastavro's parsed form)."""
    return _Compiler().compile(parsed_schema)
