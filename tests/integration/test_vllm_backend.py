"""The vLLM backend against the OpenAI protocol test server (devkit/servers/openai_server.py).

No real vLLM runs here (no GPU, no model hub): the server answers the way vLLM's documented
OpenAI-compatible server does, with fake deterministic generation. These tests do not use the
``endpoints``/``settings`` fixtures, so they need neither Kafka, MinIO nor Triton.
"""

from __future__ import annotations

import asyncio
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx2
import pytest
from pydantic import SecretStr

from devkit.servers.openai_server import OpenAIProtocolServer
from pipeline.backends.base import RowInput, RowOutput, TextPrompt
from pipeline.backends.exceptions import BackendError
from pipeline.backends.vllm import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    ServedModelNames,
    VllmBackend,
)
from pipeline.settings import VllmSettings

MODEL = "sluiceway-llm"
LORA = "summarizer-lora-v2"
API_KEY = "test-key"
REPO_ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")


@pytest.fixture
def server() -> Iterator[OpenAIProtocolServer]:
    with OpenAIProtocolServer((MODEL, LORA), max_model_len=256, api_key=API_KEY) as running:
        yield running


def vllm_settings(server: OpenAIProtocolServer, **overrides: Any) -> VllmSettings:
    values: dict[str, Any] = {
        "base_url": server.base_url,
        "api_key": SecretStr(API_KEY),
        "max_concurrency": 4,
        "timeout_s": 10.0,
        **overrides,
    }
    return VllmSettings(**values)


def with_backend(
    settings: VllmSettings,
    use: Callable[[VllmBackend], Awaitable[T]],
    **kwargs: Any,
) -> T:
    """Run ``use`` with a backend made from ``settings`` in a fresh event loop; always close."""

    async def scenario() -> T:
        backend = VllmBackend.from_settings(settings, **kwargs)
        try:
            return await use(backend)
        finally:
            await backend.close()

    return asyncio.run(scenario())


def infer(
    settings: VllmSettings,
    rows: Sequence[RowInput],
    model: str = MODEL,
    version: str | None = None,
    **kwargs: Any,
) -> list[RowOutput | BackendError]:
    return with_backend(settings, lambda b: b.infer(model, version, rows), **kwargs)


def prompt_row(i: int, **text: Any) -> RowInput:
    return RowInput(text=TextPrompt(prompt=f"row-{i} asks about topic {i} today", **text))


def chat_row(i: int, explain: bool = False, **text: Any) -> RowInput:
    messages = (("system", "Answer briefly."), ("user", f"row-{i} asks about topic {i}"))
    return RowInput(text=TextPrompt(messages=messages, **text), explain=explain)


def mixed_rows(count: int, max_tokens: int = 16) -> list[RowInput]:
    return [
        prompt_row(i, max_tokens=max_tokens) if i % 2 == 0 else chat_row(i, max_tokens=max_tokens)
        for i in range(count)
    ]


def outputs_only(outcomes: Sequence[RowOutput | BackendError]) -> list[RowOutput]:
    assert all(isinstance(o, RowOutput) for o in outcomes), outcomes
    return [o for o in outcomes if isinstance(o, RowOutput)]


# ------------------------------------------------------------------ serving


def test_32_mixed_rows_are_all_answered_in_order(server: OpenAIProtocolServer) -> None:
    rows = mixed_rows(32)
    outputs = outputs_only(infer(vllm_settings(server), rows))
    assert len(outputs) == 32
    for i, output in enumerate(outputs):
        assert output.text is not None
        assert f"row-{i} " in f"{output.text} "  # each answer belongs to its own row
        assert output.finish_reason == "stop"
        assert output.usage["total_tokens"] == (
            output.usage["prompt_tokens"] + output.usage["completion_tokens"]
        )
    posts = [r for r in server.requests if r.method == "POST"]
    assert sorted(r.path for r in posts) == sorted(
        ["/v1" + COMPLETIONS_PATH] * 16 + ["/v1" + CHAT_PATH] * 16
    )
    assert {r.body["model"] for r in posts} == {MODEL}
    assert {r.authorization for r in posts} == {f"Bearer {API_KEY}"}


def test_max_tokens_cuts_the_answer_with_finish_reason_length(
    server: OpenAIProtocolServer,
) -> None:
    outputs = outputs_only(infer(vllm_settings(server), mixed_rows(4, max_tokens=2)))
    for output in outputs:
        assert output.finish_reason == "length"
        assert output.usage["completion_tokens"] == 2
        assert output.text is not None
        assert len(output.text.split()) == 2


def test_concurrency_is_capped_and_used(server: OpenAIProtocolServer) -> None:
    server.latency_s = 0.05  # requests overlap only if they are sent concurrently
    outputs_only(infer(vllm_settings(server, max_concurrency=4), mixed_rows(32)))
    assert server.requests_total == 32
    assert 1 < server.max_concurrency <= 4


def test_the_cap_is_shared_by_concurrent_batches(server: OpenAIProtocolServer) -> None:
    server.latency_s = 0.05

    async def two_batches(backend: VllmBackend) -> list[list[RowOutput | BackendError]]:
        return list(
            await asyncio.gather(
                backend.infer(MODEL, None, mixed_rows(16)),
                backend.infer(MODEL, None, mixed_rows(16)),
            )
        )

    first, second = with_backend(vllm_settings(server, max_concurrency=3), two_batches)
    assert len(outputs_only(first)) == len(outputs_only(second)) == 16
    assert 1 < server.max_concurrency <= 3


def test_a_version_is_served_under_its_mapped_model_name(server: OpenAIProtocolServer) -> None:
    names: ServedModelNames = {("summarizer", "2"): LORA}
    outputs_only(
        infer(vllm_settings(server), mixed_rows(2), "summarizer", "2", served_model_names=names)
    )
    assert {r.body["model"] for r in server.requests if r.method == "POST"} == {LORA}


# ------------------------------------------------------------------ explanations


def test_logprobs_are_returned_when_asked_and_absent_otherwise(
    server: OpenAIProtocolServer,
) -> None:
    rows = [
        prompt_row(0, logprobs=3),
        chat_row(1, explain=True),
        prompt_row(2),
        chat_row(3),
        RowInput(text=TextPrompt(prompt="row-4 explained by default"), explain=True),
        chat_row(5, logprobs=2),
    ]
    out = outputs_only(infer(vllm_settings(server), rows))
    expected_top = {0: 3, 1: 5, 4: 5, 5: 2}
    for i, output in enumerate(out):
        if i not in expected_top:
            assert output.token_logprobs == ()
            continue
        assert output.text is not None
        assert len(output.token_logprobs) == output.usage["completion_tokens"] > 0
        assert "".join(t.token for t in output.token_logprobs) == output.text
        for token in output.token_logprobs:
            assert token.logprob < 0
            assert len(token.top) == expected_top[i]
            assert token.top[0] == (token.token, token.logprob)  # greedy: best first
            values = [value for _, value in token.top]
            assert values == sorted(values, reverse=True)


# ------------------------------------------------------------------ permanent errors


def test_a_400_fails_only_its_row(server: OpenAIProtocolServer) -> None:
    rows = mixed_rows(6)
    rows[3] = chat_row(3, max_tokens=1000)  # longer than the model's 256-token context
    outcomes = infer(vllm_settings(server), rows)
    error = outcomes[3]
    assert isinstance(error, BackendError)
    assert not error.transient
    assert error.reason == "backend_bad_request"
    assert error.status == 400
    assert "maximum context length is 256 tokens" in str(error)
    others = outcomes[:3] + outcomes[4:]
    assert len(outputs_only(others)) == 5


@pytest.mark.parametrize("shape", ["nested", "flat"])
def test_an_unknown_model_is_permanent_in_either_error_shape(
    shape: Literal["nested", "flat"],
) -> None:
    with OpenAIProtocolServer((MODEL,), api_key=API_KEY, error_shape=shape) as running:
        outcomes = infer(vllm_settings(running), mixed_rows(3), model="no-such-model")
    assert len(outcomes) == 3
    for error in outcomes:
        assert isinstance(error, BackendError)
        assert not error.transient
        assert error.reason == "unknown_model"
        assert error.status == 404
        assert "The model `no-such-model` does not exist." in str(error)


def test_an_unmapped_version_name_is_an_unknown_model(server: OpenAIProtocolServer) -> None:
    outcomes = infer(vllm_settings(server), mixed_rows(2), "summarizer", "3")
    assert all(
        isinstance(o, BackendError) and not o.transient and o.reason == "unknown_model"
        for o in outcomes
    )


# ------------------------------------------------------------------ transient errors


@pytest.mark.parametrize(
    ("status", "reason", "retry_after"),
    [(429, "backend_rate_limited", 2), (503, "backend_unavailable", 7)],
)
def test_a_whole_batch_rejected_raises_one_transient_error_with_retry_after(
    server: OpenAIProtocolServer, status: int, reason: str, retry_after: int
) -> None:
    rows = mixed_rows(5)
    server.fail_next(len(rows), status, retry_after=retry_after)
    with pytest.raises(BackendError) as caught:
        infer(vllm_settings(server), rows)
    error = caught.value
    assert error.transient
    assert error.reason == reason
    assert error.status == status
    assert error.retry_after_s == float(retry_after)
    assert server.requests_total == len(rows)


def test_some_rows_rejected_come_back_as_per_row_transient_errors(
    server: OpenAIProtocolServer,
) -> None:
    rows = mixed_rows(8)
    server.fail_next(3, 503, retry_after=1)
    outcomes = infer(vllm_settings(server), rows)
    failed = [i for i, o in enumerate(outcomes) if isinstance(o, BackendError)]
    assert len(failed) == 3
    for i in failed:
        error = outcomes[i]
        assert isinstance(error, BackendError)
        assert error.transient
        assert error.reason == "backend_unavailable"
        assert error.retry_after_s == 1.0
    # The worker retries exactly those rows; the server has recovered.
    retried = outputs_only(infer(vllm_settings(server), [rows[i] for i in failed]))
    for i, output in zip(failed, retried, strict=True):
        assert output.text is not None
        assert f"row-{i} " in f"{output.text} "


def test_a_slow_server_is_a_transient_timeout(server: OpenAIProtocolServer) -> None:
    server.latency_s = 30.0  # far beyond the client's timeout; stop() cuts it short
    started = time.monotonic()
    with pytest.raises(BackendError) as caught:
        infer(vllm_settings(server, timeout_s=0.3), mixed_rows(3))
    assert caught.value.transient
    assert caught.value.reason == "backend_timeout"
    assert time.monotonic() - started < 10.0


def test_a_server_that_is_down_is_transient() -> None:
    with OpenAIProtocolServer() as gone:
        settings = vllm_settings(gone)
    with pytest.raises(BackendError) as caught:
        infer(settings, mixed_rows(2))
    assert caught.value.transient
    assert caught.value.reason == "backend_unavailable"
    assert isinstance(caught.value.__cause__, BackendError)
    assert caught.value.__cause__.transient
    assert isinstance(caught.value.__cause__.__cause__, httpx2.TransportError)


def test_a_wrong_api_key_is_transient_not_dead_lettered(server: OpenAIProtocolServer) -> None:
    with pytest.raises(BackendError) as caught:
        infer(vllm_settings(server, api_key=SecretStr("wrong")), mixed_rows(2))
    assert caught.value.transient
    assert caught.value.reason == "backend_unauthorized"
    assert caught.value.status == 401
    assert "wrong" not in str(caught.value)


# ------------------------------------------------------------------ the server itself


def test_the_server_answers_health_and_models(server: OpenAIProtocolServer) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx2.Client(base_url=server.url, timeout=10.0) as client:
        assert client.get("/health").status_code == 200
        models = client.get("/v1/models", headers=headers).json()
        unauthorized = client.get("/v1/models")
    assert models["object"] == "list"
    assert [card["id"] for card in models["data"]] == [MODEL, LORA]
    assert all(card["object"] == "model" for card in models["data"])
    assert unauthorized.status_code == 401


def test_the_server_runs_as_a_process_until_sigterm() -> None:
    command = [
        sys.executable,
        "-m",
        "devkit.servers.openai_server",
        "--port",
        "0",
        "--model",
        "demo-llm",
    ]
    with subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            with selectors.DefaultSelector() as selector:
                selector.register(proc.stdout, selectors.EVENT_READ)
                assert selector.select(timeout=30), "the server printed nothing within 30s"
            banner = proc.stdout.readline()
            base_url = banner.split(" on ", 1)[1].split()[0]
            with httpx2.Client(base_url=base_url, timeout=10.0) as client:
                answer = client.post(
                    "/completions",
                    json={"model": "demo-llm", "prompt": "one two three", "max_tokens": 8},
                ).json()
            assert answer["choices"][0]["text"] == "Summary: one two three"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
