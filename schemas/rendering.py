"""Results as people (and JSON tools) read them."""

from __future__ import annotations

from typing import Any

import numpy as np

from schemas.models import InferenceResult

_NUMPY_DTYPES = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4"}


def readable(result: InferenceResult) -> dict[str, Any]:
    """The result as a person (or a JSON tool) reads it: tensors as nested lists of numbers."""
    data: dict[str, Any] = result.model_dump(mode="json", exclude_none=True, exclude={"outputs"})
    outputs = result.outputs
    if outputs is not None and outputs.tensors:
        data["outputs"] = {
            t.name: np.frombuffer(t.data, dtype=_NUMPY_DTYPES[t.datatype.value])
            .reshape(t.shape)
            .tolist()
            for t in outputs.tensors
            if t.datatype.value in _NUMPY_DTYPES
        }
    elif outputs is not None and outputs.text is not None:
        data["outputs"] = outputs.text.model_dump(mode="json", exclude_none=True)
    return data
