"""vLLM over its OpenAI-compatible HTTP API: ``/v1/completions`` and ``/v1/chat/completions``.

vLLM batches continuously on its side, so a micro-batch is sent as concurrent requests, one per
row, under a concurrency cap shared by every call on this backend, over one connection pool.
A row with a ``prompt`` goes to the completions API, a row with ``messages`` to the chat API.
Token log-probabilities (the LLM explanation) are asked for when the row wants an explanation.

Outcomes are per row, as vLLM answers per request: one row's 400 is that row's
:class:`BackendError` (not transient) while the others succeed. Only when every row failed
transiently does :meth:`VllmBackend.infer` raise, so that the worker retries the whole batch and
its circuit breaker counts the failure.

Request building and response parsing are pure functions below the I/O class and are unit
tested on their own; the adapter is verified against ``devkit/servers/openai_server.py``, a protocol
test server built from vLLM's documented responses (see ``docs/vllm.md``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx2

from pipeline.backends.base import RowInput, RowOutput, TextPrompt, TokenLogprob
from pipeline.backends.exceptions import BackendError
from pipeline.backends.signature import ModelSignature
from pipeline.deadlines import backend_timeout_s
from pipeline.settings import VllmSettings

COMPLETIONS_PATH = "/completions"
CHAT_PATH = "/chat/completions"
DEFAULT_EXPLAIN_TOP_LOGPROBS = 5
"""Alternatives per token when a row asks for an explanation without naming a count."""

ServedModelNames = Mapping[tuple[str, str | None], str]


# ---------------------------------------------------------------------------- pure helpers


def served_model_name(
    model: str, version: str | None, names: ServedModelNames | None = None
) -> str:
    """The model name to send: the mapping's entry for (model, version), else ``model``.

    vLLM has no version concept; versions and LoRA adapters are served as distinct names
    (``--served-model-name``, ``--lora-modules name=path``), which the mapping spells out.
    """
    if names:
        found = names.get((model, version))
        if found is not None:
            return found
    return model


def wanted_top_logprobs(row: RowInput) -> int | None:
    """How many alternatives per token to ask for, or ``None`` when no logprobs are wanted."""
    text = row.text
    if text is not None and text.logprobs is not None:
        return text.logprobs
    if row.explain:
        return DEFAULT_EXPLAIN_TOP_LOGPROBS
    return None


def build_request(model_name: str, row: RowInput) -> tuple[str, dict[str, Any]]:
    """Return the path (relative to the base URL) and JSON body for one row.

    Raises a :class:`BackendError` (``backend_bad_request``, not transient) for a row that has no
    text, or neither a prompt nor messages: no server could answer it.
    """
    text: TextPrompt | None = row.text
    if text is None:
        raise BackendError(
            "vllm: the row has no text prompt (vLLM serves text, not tensors)",
            reason="backend_bad_request",
        )
    body: dict[str, Any] = {
        "model": model_name,
        "max_tokens": text.max_tokens,
        "temperature": text.temperature,
        "top_p": text.top_p,
        "n": 1,
        "stream": False,
    }
    if text.stop:
        body["stop"] = list(text.stop)
    top = wanted_top_logprobs(row)
    if text.prompt is not None:
        body["prompt"] = text.prompt
        if top is not None:
            body["logprobs"] = top
        return COMPLETIONS_PATH, body
    if not text.messages:
        raise BackendError(
            "vllm: the text prompt has neither a prompt nor messages",
            reason="backend_bad_request",
        )
    body["messages"] = [{"role": role, "content": content} for role, content in text.messages]
    if top is not None:
        body["logprobs"] = True
        body["top_logprobs"] = top
    return CHAT_PATH, body


def _bad_response(detail: str) -> BackendError:
    return BackendError(f"vllm: unexpected response: {detail}", reason="backend_bad_response")


def _first_choice(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise _bad_response("the body is not a JSON object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise _bad_response("no choices")
    return choices[0]


def _usage(body: Mapping[str, Any]) -> dict[str, int]:
    usage = body.get("usage")
    if not isinstance(usage, Mapping):
        return {}
    names = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {n: int(usage[n]) for n in names if isinstance(usage.get(n), int)}


def _float(value: Any) -> float:
    # vLLM reports -inf as a large negative number or null depending on version.
    return float(value) if isinstance(value, int | float) else -math.inf


def _completion_logprobs(logprobs: Any) -> tuple[TokenLogprob, ...]:
    if not isinstance(logprobs, Mapping):
        return ()
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    result = []
    for i, token in enumerate(tokens):
        top = tops[i] if i < len(tops) and isinstance(tops[i], Mapping) else {}
        ranked = sorted(((str(t), _float(lp)) for t, lp in top.items()), key=lambda p: -p[1])
        value = values[i] if i < len(values) else None
        result.append(TokenLogprob(str(token), _float(value), tuple(ranked)))
    return tuple(result)


def _chat_logprobs(logprobs: Any) -> tuple[TokenLogprob, ...]:
    if not isinstance(logprobs, Mapping):
        return ()
    content = logprobs.get("content")
    if not isinstance(content, list):
        return ()
    result = []
    for entry in content:
        if not isinstance(entry, Mapping):
            raise _bad_response("a logprobs.content entry is not an object")
        top = tuple(
            (str(alt.get("token", "")), _float(alt.get("logprob")))
            for alt in entry.get("top_logprobs") or []
            if isinstance(alt, Mapping)
        )
        result.append(TokenLogprob(str(entry.get("token", "")), _float(entry.get("logprob")), top))
    return tuple(result)


def parse_completion(body: Any) -> RowOutput:
    """Map a ``/v1/completions`` answer (first choice) to a :class:`RowOutput`."""
    choice = _first_choice(body)
    text = choice.get("text")
    if not isinstance(text, str):
        raise _bad_response("choices[0].text is not a string")
    return RowOutput(
        text=text,
        finish_reason=_finish_reason(choice),
        token_logprobs=_completion_logprobs(choice.get("logprobs")),
        usage=_usage(body),
    )


def parse_chat_completion(body: Any) -> RowOutput:
    """Map a ``/v1/chat/completions`` answer (first choice) to a :class:`RowOutput`."""
    choice = _first_choice(body)
    message = choice.get("message")
    if not isinstance(message, Mapping):
        raise _bad_response("choices[0].message is not an object")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise _bad_response("choices[0].message.content is not a string")
    return RowOutput(
        text=content or "",
        finish_reason=_finish_reason(choice),
        token_logprobs=_chat_logprobs(choice.get("logprobs")),
        usage=_usage(body),
    )


def _finish_reason(choice: Mapping[str, Any]) -> str | None:
    reason = choice.get("finish_reason")
    return reason if isinstance(reason, str) else None


def parse_response(path: str, body: Any) -> RowOutput:
    """Parse the answer of the API that ``path`` names."""
    return parse_chat_completion(body) if path == CHAT_PATH else parse_completion(body)


def error_message(body: Any, fallback: str) -> str:
    """The message of an error body in any shape vLLM or an OpenAI gateway sends.

    Current vLLM: ``{"error": {"message", "type", "param", "code"}}``; older vLLM:
    ``{"object": "error", "message", ...}``; its API-key check: ``{"error": "Unauthorized"}``;
    FastAPI's own: ``{"detail": ...}``. Anything else yields ``fallback``.
    """
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(body.get("message"), str):
            return str(body["message"])
        if "detail" in body:
            return str(body["detail"])
    return fallback


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or HTTP-date), else None."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


def classify_status(status: int, message: str, retry_after_s: float | None = None) -> BackendError:
    """Turn a non-2xx answer into ours: transient ones are retried, the rest dead-lettered.

    401/403 are transient on purpose: a wrong or expired API key is the deployment's fault,
    not the request's, so the requests wait (breaker open) instead of being dead-lettered.
    """
    text = f"vllm: HTTP {status}: {message}"
    if status == 429:
        return BackendError(
            text,
            reason="backend_rate_limited",
            status=status,
            retry_after_s=retry_after_s,
            transient=True,
        )
    if status == 408:
        return BackendError(
            text,
            reason="backend_timeout",
            status=status,
            retry_after_s=retry_after_s,
            transient=True,
        )
    if status in (401, 403):
        return BackendError(text, reason="backend_unauthorized", status=status, transient=True)
    if status == 503:
        return BackendError(
            text,
            reason="backend_unavailable",
            status=status,
            retry_after_s=retry_after_s,
            transient=True,
        )
    if status >= 500:
        return BackendError(
            text, reason="backend_5xx", status=status, retry_after_s=retry_after_s, transient=True
        )
    if status == 404:
        return BackendError(text, reason="unknown_model", status=status)
    return BackendError(text, reason="backend_bad_request", status=status)


def settle(outcomes: Sequence[RowOutput | BackendError]) -> list[RowOutput | BackendError]:
    """Apply the batch rule: raise one transient error when every row failed transiently.

    The raised error carries the longest ``Retry-After`` any row got, so a retry of the whole
    batch waits for the slowest server hint. Otherwise outcomes are returned per row.
    """
    if not outcomes or not all(isinstance(o, BackendError) and o.transient for o in outcomes):
        return list(outcomes)
    errors = [o for o in outcomes if isinstance(o, BackendError)]
    first = errors[0]
    hints = [e.retry_after_s for e in errors]
    known = [h for h in hints if h is not None]
    raise BackendError(
        f"vllm: all {len(errors)} requests of the batch failed; first: {first}",
        reason=first.reason,
        status=first.status,
        retry_after_s=max(known) if known else None,
        transient=True,
    ) from first


# ---------------------------------------------------------------------------- I/O


class VllmBackend:
    """A :class:`~pipeline.backends.base.Backend` for one vLLM OpenAI-compatible endpoint.

    One instance belongs to one event loop: its connection pool and concurrency cap are made
    on first use inside the loop that runs :meth:`infer`, and :meth:`close` releases them.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        max_concurrency: int = 32,
        timeout_s: float = 60.0,
        served_model_names: ServedModelNames | None = None,
        timeout_floor_s: float = 0.05,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._max_concurrency = max_concurrency
        self._timeout_s = timeout_s
        self._timeout_floor_s = timeout_floor_s
        self._served_model_names = dict(served_model_names or {})
        self._client: httpx2.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None

    @classmethod
    def from_settings(
        cls,
        settings: VllmSettings,
        served_model_names: ServedModelNames | None = None,
    ) -> VllmBackend:
        key = settings.api_key.get_secret_value() if settings.api_key is not None else None
        return cls(
            settings.base_url,
            api_key=key,
            max_concurrency=settings.max_concurrency,
            timeout_s=settings.timeout_s,
            served_model_names=served_model_names,
            timeout_floor_s=settings.timeout_floor_s,
        )

    @property
    def endpoint(self) -> str:
        return f"vllm@{self._base_url}"

    @property
    def max_concurrency(self) -> int:
        return self._max_concurrency

    def __repr__(self) -> str:
        # Never shows the API key.
        return f"VllmBackend({self._base_url!r}, max_concurrency={self._max_concurrency})"

    def _connection(self) -> tuple[httpx2.AsyncClient, asyncio.Semaphore]:
        if self._client is None or self._semaphore is None:
            headers = {"Accept": "application/json"}
            if self._api_key is not None:
                headers["Authorization"] = f"Bearer {self._api_key}"
            # The pool holds as many connections as requests may be in flight, so a request
            # that got past the semaphore never queues for a connection.
            limits = httpx2.Limits(
                max_connections=self._max_concurrency,
                max_keepalive_connections=self._max_concurrency,
            )
            self._client = httpx2.AsyncClient(
                base_url=self._base_url,
                headers=headers,
                timeout=httpx2.Timeout(self._timeout_s),
                limits=limits,
            )
            self._semaphore = asyncio.Semaphore(self._max_concurrency)
        return self._client, self._semaphore

    async def describe(self, model: str) -> ModelSignature:
        """Text in, no tensors; the versions are those the served-name mapping spells out."""
        versions = {v for (m, v) in self._served_model_names if m == model and v is not None}
        return ModelSignature(versions=frozenset(versions) if versions else None)

    async def infer(
        self,
        model: str,
        version: str | None,
        rows: Sequence[RowInput],
        *,
        time_left_s: float | None = None,
        priority: int | None = None,
    ) -> list[RowOutput | BackendError]:
        """Serve one micro-batch as concurrent requests; one outcome per row, in order.

        Raises a transient :class:`BackendError` when every row failed transiently; otherwise a
        failed row's error (transient: retry the row; permanent: dead-letter it) is in its slot.
        Each request may take the batch's time left, within the floor and ceiling; the time a
        request waits for the concurrency cap counts. ``priority`` is not sent: vLLM honours a
        request's priority only when started with ``--scheduling-policy priority``.
        """
        if not rows:
            return []
        name = served_model_name(model, version, self._served_model_names)
        timeout_s = backend_timeout_s(time_left_s, self._timeout_floor_s, self._timeout_s)
        outcomes = await asyncio.gather(*(self._one(name, row, timeout_s) for row in rows))
        return settle(outcomes)

    async def _one(
        self, model_name: str, row: RowInput, timeout_s: float
    ) -> RowOutput | BackendError:
        try:
            path, body = build_request(model_name, row)
        except BackendError as error:
            return error
        client, semaphore = self._connection()
        try:
            # The bound covers the wait for the cap and the whole exchange (the deadline is
            # the request's, wherever the time goes); httpx's own timeouts are per operation.
            async with asyncio.timeout(timeout_s), semaphore:
                response = await client.post(path, json=body)
        except (TimeoutError, httpx2.TimeoutException) as exc:
            return _wrapped(
                BackendError(
                    f"vllm: no answer from {self._base_url}{path} within {timeout_s:.3f}s",
                    reason="backend_timeout",
                    transient=True,
                ),
                exc,
            )
        except httpx2.TransportError as exc:
            return _wrapped(
                BackendError(
                    f"vllm: {self._base_url}{path}: {type(exc).__name__}: {exc}",
                    reason="backend_unavailable",
                    transient=True,
                ),
                exc,
            )
        return _outcome(path, response)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        self._client = None
        self._semaphore = None


def _wrapped(error: BackendError, cause: BaseException) -> BackendError:
    # Errors are returned per row rather than raised, so chain the cause by hand
    # (what ``raise error from cause`` would have recorded).
    error.__cause__ = cause
    return error


def _json(response: httpx2.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _outcome(path: str, response: httpx2.Response) -> RowOutput | BackendError:
    body = _json(response)
    if response.status_code >= 300:
        fallback = response.text[:200] or response.reason_phrase
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return classify_status(response.status_code, error_message(body, fallback), retry_after)
    if body is None:
        return _bad_response(f"HTTP {response.status_code} without a JSON body")
    try:
        return parse_response(path, body)
    except BackendError as error:
        return error
