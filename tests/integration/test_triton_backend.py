"""The Triton backend sends one multi-row request per micro-batch and maps errors by kind."""

from __future__ import annotations

import asyncio
from typing import Literal

import numpy as np
import pytest

from pipeline.backends import BackendError, RowInput
from pipeline.backends.triton import TritonBackend
from pipeline.settings import Settings


def _rows(counts: list[int]) -> list[RowInput]:
    rows, start = [], 0
    for count in counts:
        block = np.arange(start * 4, (start + count) * 4, dtype=np.float32).reshape(count, 4)
        rows.append(RowInput(tensors={"x": block}))
        start += count
    return rows


def _backend(settings: Settings, protocol: Literal["grpc", "http"]) -> TritonBackend:
    triton = settings.backends.triton
    return TritonBackend(triton.grpc_url if protocol == "grpc" else triton.http_url, protocol)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_batch_is_one_request_and_outputs_return_to_their_rows(
    settings: Settings, protocol: Literal["grpc", "http"]
) -> None:
    rows = _rows([1, 3, 2, 1])

    async def run() -> list[object]:
        backend = _backend(settings, protocol)
        try:
            return list(await backend.infer("scaler", "2", rows))
        finally:
            await backend.close()

    outputs = asyncio.run(run())
    assert len(outputs) == len(rows)
    for row, output in zip(rows, outputs, strict=True):
        assert not isinstance(output, Exception)
        np.testing.assert_array_equal(output.tensors["y"], row.tensors["x"] * 3.0)


def test_unknown_model_version_is_permanent(settings: Settings) -> None:
    async def run() -> None:
        backend = _backend(settings, "grpc")
        try:
            await backend.infer("scaler", "9", _rows([1]))
        finally:
            await backend.close()

    with pytest.raises(BackendError) as caught:
        asyncio.run(run())
    assert not caught.value.transient
    assert caught.value.reason == "unknown_model"


def test_wrong_shape_is_permanent(settings: Settings) -> None:
    async def run() -> None:
        backend = _backend(settings, "grpc")
        try:
            await backend.infer("scaler", "1", [RowInput(tensors={"x": np.ones((1, 3), "f4")})])
        finally:
            await backend.close()

    with pytest.raises(BackendError) as caught:
        asyncio.run(run())
    assert not caught.value.transient
    assert caught.value.reason == "backend_bad_request"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unreachable_server_is_transient(protocol: Literal["grpc", "http"]) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def run() -> None:
        backend = TritonBackend(f"127.0.0.1:{port}", protocol, timeout_s=5)
        try:
            await backend.infer("scaler", "1", _rows([1]))
        finally:
            await backend.close()

    with pytest.raises(BackendError) as caught:
        asyncio.run(run())
    assert caught.value.transient
    assert caught.value.reason == "backend_unavailable"
