"""The inference server is a real Triton: both protocols, two versions, dynamic batching."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_grpc_aio
import tritonclient.http as triton_http

from pipeline.settings import Settings

SCALE_BY_VERSION = {"1": 2.0, "2": 3.0}


@pytest.mark.parametrize("version", ["1", "2"])
def test_grpc_inference_answers_per_requested_version(settings: Settings, version: str) -> None:
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    client = triton_grpc.InferenceServerClient(settings.backends.triton.grpc_url)
    try:
        tensor = triton_grpc.InferInput("x", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows)
        result = client.infer("scaler", [tensor], model_version=version)
        assert result.get_response().model_version == version
        np.testing.assert_array_equal(result.as_numpy("y"), rows * SCALE_BY_VERSION[version])
    finally:
        client.close()


def test_http_inference_and_metadata(settings: Settings) -> None:
    rows = np.full((2, 4), 1.5, dtype=np.float32)
    client = triton_http.InferenceServerClient(settings.backends.triton.http_url)
    try:
        assert client.is_server_ready()
        metadata = client.get_model_metadata("scaler")
        assert metadata["inputs"][0]["name"] == "x"
        assert sorted(metadata["versions"]) == ["1", "2"]
        tensor = triton_http.InferInput("x", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows)
        result = client.infer("scaler", [tensor], model_version="2")
        np.testing.assert_array_equal(result.as_numpy("y"), rows * 3.0)
    finally:
        client.close()


def test_dynamic_batcher_merges_concurrent_requests(settings: Settings) -> None:
    url = settings.backends.triton.grpc_url
    concurrent = 64

    async def run() -> tuple[dict[str, int], dict[str, int], list[np.ndarray]]:
        client = triton_grpc_aio.InferenceServerClient(url)
        try:
            before = await _version_stats(client, "1")

            async def one(index: int) -> np.ndarray:
                row = np.full((1, 4), float(index), dtype=np.float32)
                tensor = triton_grpc_aio.InferInput("x", [1, 4], "FP32")
                tensor.set_data_from_numpy(row)
                result = await client.infer("scaler", [tensor], model_version="1")
                return np.asarray(result.as_numpy("y"))

            outputs = await asyncio.gather(*(one(i) for i in range(concurrent)))
            after = await _version_stats(client, "1")
            return before, after, outputs
        finally:
            await client.close()

    before, after, outputs = asyncio.run(run())
    for index, output in enumerate(outputs):
        np.testing.assert_array_equal(output, np.full((1, 4), index * 2.0, dtype=np.float32))
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == concurrent
    # Fewer model executions than requests: Triton's dynamic batcher merged them.
    assert 0 < executions < concurrent


async def _version_stats(
    client: triton_grpc_aio.InferenceServerClient, version: str
) -> dict[str, int]:
    stats = await client.get_inference_statistics("scaler", version, as_json=True)
    model = stats["model_stats"][0]
    return {
        "inference_count": int(model.get("inference_count", 0)),
        "execution_count": int(model.get("execution_count", 0)),
    }
