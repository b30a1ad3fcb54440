"""The vLLM adapter's pure parts: request bodies, response parsing, error and batch rules."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from pydantic import SecretStr

from pipeline.backends.base import RowInput, RowOutput, TextPrompt, TokenLogprob
from pipeline.backends.exceptions import BackendError
from pipeline.backends.vllm import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    DEFAULT_EXPLAIN_TOP_LOGPROBS,
    ServedModelNames,
    VllmBackend,
    build_request,
    classify_status,
    error_message,
    parse_chat_completion,
    parse_completion,
    parse_response,
    parse_retry_after,
    served_model_name,
    settle,
)
from pipeline.settings import VllmSettings

# ------------------------------------------------------------------------- requests


def test_prompt_row_goes_to_completions_with_generation_parameters() -> None:
    row = RowInput(
        text=TextPrompt(prompt="Say hi", max_tokens=7, temperature=0.3, top_p=0.9, stop=("\n",))
    )
    path, body = build_request("llama", row)
    assert path == COMPLETIONS_PATH
    assert body == {
        "model": "llama",
        "prompt": "Say hi",
        "max_tokens": 7,
        "temperature": 0.3,
        "top_p": 0.9,
        "n": 1,
        "stream": False,
        "stop": ["\n"],
    }


def test_messages_row_goes_to_chat_completions() -> None:
    row = RowInput(text=TextPrompt(messages=(("system", "Be brief."), ("user", "Hello"))))
    path, body = build_request("llama", row)
    assert path == CHAT_PATH
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ]
    assert "prompt" not in body
    assert "stop" not in body
    assert "logprobs" not in body
    assert "top_logprobs" not in body


def test_completions_logprobs_are_an_integer_count() -> None:
    _, body = build_request("m", RowInput(text=TextPrompt(prompt="x", logprobs=3)))
    assert body["logprobs"] == 3


def test_chat_logprobs_are_a_flag_and_a_top_count() -> None:
    row = RowInput(text=TextPrompt(messages=(("user", "x"),), logprobs=2))
    _, body = build_request("m", row)
    assert body["logprobs"] is True
    assert body["top_logprobs"] == 2


@pytest.mark.parametrize(
    "text",
    [TextPrompt(prompt="x"), TextPrompt(messages=(("user", "x"),))],
    ids=["prompt", "chat"],
)
def test_explain_asks_for_the_default_number_of_alternatives(text: TextPrompt) -> None:
    _, body = build_request("m", RowInput(text=text, explain=True))
    top = body["top_logprobs"] if "messages" in body else body["logprobs"]
    assert top == DEFAULT_EXPLAIN_TOP_LOGPROBS


def test_an_explicit_count_wins_over_the_explain_default() -> None:
    _, body = build_request("m", RowInput(text=TextPrompt(prompt="x", logprobs=0), explain=True))
    assert body["logprobs"] == 0


def test_a_row_without_text_is_a_permanent_error() -> None:
    row = RowInput(tensors={"x": np.zeros((1, 4), dtype=np.float32)})
    with pytest.raises(BackendError) as caught:
        build_request("m", row)
    assert not caught.value.transient
    assert caught.value.reason == "backend_bad_request"


def test_a_text_with_neither_prompt_nor_messages_is_a_permanent_error() -> None:
    with pytest.raises(BackendError, match="neither a prompt nor messages") as caught:
        build_request("m", RowInput(text=TextPrompt()))
    assert not caught.value.transient


def test_served_model_name_uses_the_mapping_for_a_version_else_the_model() -> None:
    names: ServedModelNames = {("summarizer", "2"): "summarizer-lora-v2"}
    assert served_model_name("summarizer", "2", names) == "summarizer-lora-v2"
    assert served_model_name("summarizer", "3", names) == "summarizer"
    assert served_model_name("summarizer", None, names) == "summarizer"
    assert served_model_name("summarizer", "2") == "summarizer"


# ------------------------------------------------------------------------- responses

COMPLETION: dict[str, Any] = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "text": " Paris is",
            "logprobs": {
                "text_offset": [0, 6],
                "token_logprobs": [-0.1, -0.7],
                "tokens": [" Paris", " is"],
                "top_logprobs": [{" London": -2.5, " Paris": -0.1}, {" is": -0.7, " was": -1.2}],
            },
            "finish_reason": "length",
            "stop_reason": None,
        }
    ],
    "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
}

CHAT: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi", "tool_calls": []},
            "logprobs": {
                "content": [
                    {
                        "token": "Hi",
                        "logprob": -0.05,
                        "bytes": [72, 105],
                        "top_logprobs": [
                            {"token": "Hi", "logprob": -0.05, "bytes": [72, 105]},
                            {"token": "Hello", "logprob": -3.0, "bytes": None},
                        ],
                    }
                ]
            },
            "finish_reason": "stop",
            "stop_reason": None,
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
}


def test_parse_completion_maps_text_finish_usage_and_ranked_logprobs() -> None:
    out = parse_completion(COMPLETION)
    assert out.text == " Paris is"
    assert out.finish_reason == "length"
    assert out.usage == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert out.token_logprobs == (
        TokenLogprob(" Paris", -0.1, ((" Paris", -0.1), (" London", -2.5))),
        TokenLogprob(" is", -0.7, ((" is", -0.7), (" was", -1.2))),
    )


def test_parse_chat_completion_maps_message_and_logprobs_content() -> None:
    out = parse_chat_completion(CHAT)
    assert out == RowOutput(
        text="Hi",
        finish_reason="stop",
        token_logprobs=(TokenLogprob("Hi", -0.05, (("Hi", -0.05), ("Hello", -3.0))),),
        usage={"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    )


def test_no_logprobs_in_the_answer_means_none_in_the_output() -> None:
    body = {**COMPLETION, "choices": [{**COMPLETION["choices"][0], "logprobs": None}]}
    assert parse_completion(body).token_logprobs == ()
    chat = {**CHAT, "choices": [{**CHAT["choices"][0], "logprobs": None}]}
    assert parse_chat_completion(chat).token_logprobs == ()


def test_missing_logprob_values_read_as_minus_infinity() -> None:
    body = {
        "choices": [
            {
                "text": "a",
                "logprobs": {"tokens": ["a"], "token_logprobs": [None], "top_logprobs": [None]},
            }
        ]
    }
    (only,) = parse_completion(body).token_logprobs
    assert only.token == "a"
    assert math.isinf(only.logprob)
    assert only.top == ()


def test_parse_response_picks_the_parser_by_path() -> None:
    assert parse_response(CHAT_PATH, CHAT).text == "Hi"
    assert parse_response(COMPLETIONS_PATH, COMPLETION).text == " Paris is"


@pytest.mark.parametrize(
    "body",
    [[], {"choices": []}, {"choices": [{"text": 3}]}, {"choices": "x"}],
    ids=["not-object", "no-choices", "text-not-string", "choices-not-list"],
)
def test_malformed_completion_is_a_bad_response(body: Any) -> None:
    with pytest.raises(BackendError) as caught:
        parse_completion(body)
    assert not caught.value.transient
    assert caught.value.reason == "backend_bad_response"


def test_chat_without_message_is_a_bad_response() -> None:
    with pytest.raises(BackendError) as caught:
        parse_chat_completion({"choices": [{"index": 0}]})
    assert not caught.value.transient
    assert caught.value.reason == "backend_bad_response"


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError"}},
            "The model `x` does not exist.",
        ),
        ({"object": "error", "message": "too long", "type": "BadRequestError"}, "too long"),
        ({"error": "Unauthorized"}, "Unauthorized"),
        ({"detail": "Not Found"}, "Not Found"),
        (None, "fallback"),
        ({"unrelated": 1}, "fallback"),
    ],
    ids=["nested", "flat", "api-key", "fastapi", "no-json", "unknown"],
)
def test_error_message_reads_every_known_shape(body: Any, expected: str) -> None:
    assert error_message(body, "fallback") == expected


@pytest.mark.parametrize(
    ("status", "transient", "reason"),
    [
        (400, False, "backend_bad_request"),
        (404, False, "unknown_model"),
        (413, False, "backend_bad_request"),
        (422, False, "backend_bad_request"),
        (401, True, "backend_unauthorized"),
        (403, True, "backend_unauthorized"),
        (408, True, "backend_timeout"),
        (429, True, "backend_rate_limited"),
        (500, True, "backend_5xx"),
        (502, True, "backend_5xx"),
        (503, True, "backend_unavailable"),
        (504, True, "backend_5xx"),
    ],
)
def test_classify_status(status: int, transient: bool, reason: str) -> None:
    error = classify_status(status, "boom", retry_after_s=1.0)
    assert error.transient is transient
    assert error.reason == reason
    assert error.status == status
    assert f"HTTP {status}: boom" in str(error)


def test_retry_after_is_kept_for_429_and_503() -> None:
    for status in (429, 503):
        error = classify_status(status, "slow down", retry_after_s=2.5)
        assert isinstance(error, BackendError)
        assert error.transient
        assert error.retry_after_s == 2.5


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        (" 1.5 ", 1.5),
        ("-4", 0.0),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
        ("soon", None),
        ("nan", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)
    assert parse_retry_after(value, now) == expected


# ------------------------------------------------------------------------- batch rule

OK = RowOutput(text="ok")


def test_settle_returns_per_row_outcomes_when_some_rows_succeeded() -> None:
    transient = BackendError(
        "busy", reason="backend_unavailable", retry_after_s=1.0, transient=True
    )
    permanent = BackendError("bad", reason="backend_bad_request")
    outcomes: list[RowOutput | BackendError] = [OK, transient, permanent]
    assert settle(outcomes) == outcomes


def test_settle_returns_per_row_errors_when_failures_are_mixed() -> None:
    transient = BackendError("busy", reason="backend_unavailable", transient=True)
    permanent = BackendError("bad", reason="backend_bad_request")
    assert settle([transient, permanent]) == [transient, permanent]


def test_settle_raises_once_when_every_row_failed_transiently() -> None:
    rows: list[RowOutput | BackendError] = [
        BackendError(
            "a", reason="backend_rate_limited", status=429, retry_after_s=1.0, transient=True
        ),
        BackendError(
            "b", reason="backend_rate_limited", status=429, retry_after_s=4.0, transient=True
        ),
        BackendError("c", reason="backend_timeout", transient=True),
    ]
    with pytest.raises(BackendError) as caught:
        settle(rows)
    assert caught.value.transient
    error = caught.value
    assert error.reason == "backend_rate_limited"
    assert error.status == 429
    assert error.retry_after_s == 4.0
    assert error.__cause__ is rows[0]
    assert "all 3 requests" in str(error)


def test_settle_of_an_empty_batch_is_empty() -> None:
    assert settle([]) == []


# ------------------------------------------------------------------------- construction


def test_from_settings_takes_url_cap_timeout_and_secret_key() -> None:
    settings = VllmSettings(
        base_url="http://vllm.internal:8000/v1/",
        api_key=SecretStr("token-abc"),
        max_concurrency=7,
        timeout_s=3.0,
    )
    backend = VllmBackend.from_settings(settings)
    assert backend.endpoint == "vllm@http://vllm.internal:8000/v1"
    assert backend.max_concurrency == 7
    assert "token-abc" not in repr(backend)


@pytest.mark.parametrize(
    "kwargs", [{"max_concurrency": 0}, {"timeout_s": 0.0}], ids=["cap", "timeout"]
)
def test_constructor_rejects_impossible_limits(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        VllmBackend("http://127.0.0.1:1/v1", **kwargs)
