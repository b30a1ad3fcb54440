"""What a served model declares it takes: input tensors and the versions it has.

A request is checked against its model's signature when the worker accepts it, so a tensor
of the wrong name, type or shape is refused with a reason on its own, instead of failing the
micro-batch it would have been stacked into (and every innocent neighbour with it).
Pure: the backends build signatures from what their servers say (Triton's model metadata).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

ANY_SIZE = -1
"""A dimension the model accepts at any size (Triton writes it ``-1``)."""

NUMPY_DATATYPES: dict[str, str] = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
"""KServe v2 datatype -> the numpy type a request's raw tensor bytes are read as."""


class SignatureMismatch(ValueError):
    """A request's tensors are not what the model declares; the message says how."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    """KServe v2 name (``FP32``, ``INT64``, ``BYTES``, ...)."""
    shape: tuple[int, ...]
    """One row's shape, batch axis excluded; :data:`ANY_SIZE` where any size goes."""


@dataclass(frozen=True, slots=True)
class ModelSignature:
    """Inputs a model takes, and the versions its server has (``None``: not known)."""

    inputs: tuple[TensorSpec, ...] = ()
    versions: frozenset[str] | None = None
    max_rows: int | None = None
    """Rows one request may carry (Triton's ``max_batch_size``); ``None``: no limit known."""

    def check(self, tensors: Mapping[str, npt.NDArray[Any]]) -> None:
        """Raise :class:`SignatureMismatch` unless ``tensors`` are exactly the declared inputs.

        Each array carries a leading batch axis (the request's rows); every input must have
        the same number of rows, at least one.
        """
        declared = {spec.name: spec for spec in self.inputs}
        if set(tensors) != set(declared):
            raise SignatureMismatch(
                f"tensors {_names(tensors)} do not match the model's inputs {_names(declared)}"
            )
        rows: set[int] = set()
        for name, array in tensors.items():
            spec = declared[name]
            expected = NUMPY_DATATYPES.get(spec.datatype)
            if expected is None or np.dtype(array.dtype) != np.dtype(expected):
                raise SignatureMismatch(
                    f"tensor {_shown(name)} is {_datatype_of(array)}, the model takes "
                    f"{spec.datatype}"
                )
            if array.ndim != len(spec.shape) + 1 or not all(
                want in (ANY_SIZE, got)
                for want, got in zip(spec.shape, array.shape[1:], strict=True)
            ):
                raise SignatureMismatch(
                    f"tensor {_shown(name)} has shape {list(array.shape)}, the model takes "
                    f"[rows, {', '.join(str(d) for d in spec.shape)}]"
                )
            rows.add(int(array.shape[0]))
        if len(rows) > 1:
            raise SignatureMismatch(f"tensors carry different row counts {sorted(rows)}")
        count = next(iter(rows), 0)
        if count < 1:
            raise SignatureMismatch("tensors carry no rows")
        if self.max_rows is not None and count > self.max_rows:
            raise SignatureMismatch(f"{count} rows in one request; the model takes {self.max_rows}")

    def knows_version(self, version: str) -> bool:
        return self.versions is not None and version in self.versions


def from_kserve_metadata(metadata: Mapping[str, Any], max_rows: int | None) -> ModelSignature:
    """A signature from KServe v2 model metadata (``GET /v2/models/<m>``, as JSON).

    With batching (``max_rows`` set), the first dimension Triton reports is the batch axis.
    """
    inputs = []
    for tensor in metadata.get("inputs", ()):
        shape = tuple(int(d) for d in tensor.get("shape", ()))
        if max_rows and shape:
            shape = shape[1:]
        inputs.append(TensorSpec(str(tensor["name"]), str(tensor["datatype"]), shape))
    versions = metadata.get("versions")
    return ModelSignature(
        inputs=tuple(inputs),
        versions=frozenset(str(v) for v in versions) if versions else None,
        max_rows=max_rows or None,
    )


def _names(names: Sequence[str] | Mapping[str, Any]) -> str:
    return "[" + ", ".join(_shown(n) for n in sorted(names)) + "]"


def _shown(name: str) -> str:
    """A name from a request, cut short for an error message."""
    return repr(name if len(name) <= 64 else name[:61] + "...")


def _datatype_of(array: npt.NDArray[Any]) -> str:
    code = np.dtype(array.dtype).newbyteorder("<").str if array.dtype.byteorder == ">" else None
    for datatype, numpy_code in NUMPY_DATATYPES.items():
        if np.dtype(array.dtype) == np.dtype(numpy_code) or code == numpy_code:
            return datatype
    return str(array.dtype)
