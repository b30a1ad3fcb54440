"""The backend interface: one call per micro-batch, one output (or error) per request.

A backend receives a whole batch and decides how to send it: Triton stacks the rows into one
multi-row request; vLLM (which batches continuously on its side) sends concurrent requests
under a concurrency cap. Never one request at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from pipeline.backends.exceptions import BackendError
from pipeline.backends.signature import ModelSignature

Array = npt.NDArray[Any]

ATTRIBUTIONS_OUTPUT = "attributions"
"""The output tensor of an explaining model: one contribution per input feature."""


@dataclass(frozen=True)
class TextPrompt:
    """A completion prompt or a chat conversation, with generation parameters."""

    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] = ()
    """(role, content) pairs for chat; used when ``prompt`` is ``None``."""
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    """How many top log-probabilities per token to return (the LLM explanation)."""


@dataclass(frozen=True)
class RowInput:
    """One request's inputs: named tensors whose first axis is that request's rows, or text."""

    tensors: Mapping[str, Array] = field(default_factory=dict)
    text: TextPrompt | None = None
    explain: bool = False

    @property
    def rows(self) -> int:
        if not self.tensors:
            return 1
        return int(next(iter(self.tensors.values())).shape[0])


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class RowOutput:
    """One request's outputs: named tensors (its rows only), or generated text."""

    tensors: Mapping[str, Array] = field(default_factory=dict)
    text: str | None = None
    finish_reason: str | None = None
    token_logprobs: tuple[TokenLogprob, ...] = ()
    usage: Mapping[str, int] = field(default_factory=dict)


class Backend(Protocol):
    """What the worker needs from an inference server."""

    @property
    def endpoint(self) -> str:
        """Identifies the server for breakers, metrics and logs (e.g. ``triton@host:8001``)."""
        ...

    async def infer(
        self,
        model: str,
        version: str | None,
        rows: Sequence[RowInput],
        *,
        time_left_s: float | None = None,
        priority: int | None = None,
    ) -> list[RowOutput | BackendError]:
        """Serve one micro-batch; return exactly one entry per input row, in order.

        ``time_left_s``: until the earliest deadline of the batch's requests (``None``: none
        has one); the call's timeout is that, within the backend's floor and ceiling
        (:func:`pipeline.deadlines.backend_timeout_s`). ``priority``: the most urgent
        request's (0-9, 9 first), for servers that queue by priority.

        Raises :class:`~pipeline.backends.exceptions.BackendError` when the whole batch
        failed; returns a per-row error when only that row failed (vLLM answers per request).
        """
        ...

    async def describe(self, model: str) -> ModelSignature:
        """What ``model`` takes and which versions the server has.

        Raises :class:`~pipeline.backends.exceptions.BackendError` when the server cannot say
        (transient: ask again later).
        """
        ...

    async def close(self) -> None: ...


def stack_rows(rows: Sequence[RowInput]) -> dict[str, Array]:
    """Concatenate each named tensor of every row along the batch axis."""
    if not rows:
        raise ValueError("a batch holds at least one row")
    names = list(rows[0].tensors)
    for index, row in enumerate(rows):
        if list(row.tensors) != names:
            raise ValueError(f"row {index} has tensors {list(row.tensors)}, expected {names}")
    return {name: np.concatenate([row.tensors[name] for row in rows], axis=0) for name in names}


def split_rows(outputs: Mapping[str, Array], row_counts: Sequence[int]) -> list[dict[str, Array]]:
    """Cut each batched output back into per-request pieces, checking the row count."""
    total = sum(row_counts)
    for name, array in outputs.items():
        if array.shape[0] != total:
            raise ValueError(f"output {name!r} has {array.shape[0]} rows, the batch sent {total}")
    bounds = np.cumsum(row_counts)[:-1]
    pieces = {name: np.split(array, bounds) for name, array in outputs.items()}
    return [{name: pieces[name][i] for name in outputs} for i in range(len(row_counts))]
