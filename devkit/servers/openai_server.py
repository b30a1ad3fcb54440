"""A protocol test server for vLLM's OpenAI-compatible HTTP API. It is not vLLM.

No real vLLM can run on the development machines (no GPU, no model hub), so the vLLM backend
is verified against this server, which answers the way vLLM's documented OpenAI-compatible
server does (https://docs.vllm.ai, "OpenAI-Compatible Server", and the request/response
models of ``vllm/entrypoints/openai``): same paths, field names, logprobs shapes, error
envelope, status codes and messages for the cases covered. Generation is fake and
deterministic: the answer is ``"Summary:"`` followed by the prompt's first words, one
whitespace word per "token", cut at ``max_tokens``.

What it serves:

- ``POST /v1/completions``: ``prompt`` (a string), ``max_tokens``, ``temperature``, ``top_p``,
  ``stop``, ``logprobs: int`` -> ``choices[0].logprobs = {tokens, token_logprobs,
  top_logprobs, text_offset}``.
- ``POST /v1/chat/completions``: ``messages``, ``logprobs: true`` and ``top_logprobs: n`` ->
  ``choices[0].logprobs.content = [{token, logprob, bytes, top_logprobs: [...]}]``.
- ``GET /v1/models`` (a ``list`` of ``model`` cards) and ``GET /health`` (200, empty body).
- Errors in vLLM's current envelope ``{"error": {"message", "type", "param", "code"}}``, or
  with ``error_shape="flat"`` in the older ``{"object": "error", "message", ...}`` shape:
  400 ``BadRequestError`` for invalid requests (a prompt plus ``max_tokens`` longer than
  ``max_model_len`` included), 404 ``NotFoundError`` "The model `X` does not exist.", 401
  ``{"error": "Unauthorized"}`` when an API key is set and the bearer token differs.

Controls for tests (thread-safe): :meth:`OpenAIProtocolServer.fail_next` answers the next N
generation requests with a status (429, 503, ...) and an optional ``Retry-After``;
``latency_s`` delays every generation request; :meth:`hold_after` answers the next N
generation requests and holds every later one until :meth:`release` (so a test can act while
work is provably unfinished, whatever the machine's speed); ``requests_total``, ``in_flight`` and
``max_concurrency`` count what was observed; ``requests`` records what was received.

Use it as a context manager (``with OpenAIProtocolServer() as server: server.base_url``) or
as a process: ``python -m devkit.servers.openai_server --port 8080 --model NAME``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import sys
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Literal

DEFAULT_MODEL = "sluiceway-llm"
MAX_LOGPROBS = 20
"""vLLM's default ``--max-logprobs``: asking for more is a 400."""


class _RequestError(Exception):
    """An invalid request: answered with ``status`` in the error envelope."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        err_type: str = "BadRequestError",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type
        self.param = param


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received: path, parsed JSON body (if any) and Authorization header."""

    method: str
    path: str
    body: Any
    authorization: str | None


@dataclass
class _Fault:
    remaining: int
    status: int
    retry_after: str | None
    message: str


def _words(text: str) -> list[str]:
    return text.split()


def _logprob(token: str, position: int) -> float:
    # Deterministic and strictly negative, so tests can compare values across runs.
    return -round(0.01 + (zlib.crc32(f"{position}:{token}".encode()) % 1000) / 1000.0, 4)


def _alternatives(token: str, logprob: float, count: int) -> list[tuple[str, float]]:
    """The top ``count`` candidates at one position: the sampled token first (greedy)."""
    if count <= 0:
        return []
    stem = token.strip()
    candidates = [(token, logprob)]
    for rank in range(1, count):
        candidates.append((f" {stem}~{rank}", round(logprob - 0.5 * rank, 4)))
    return candidates


def _generate(source_text: str, max_tokens: int, stop: Sequence[str]) -> tuple[list[str], str, str]:
    """Return (tokens, text, finish_reason): a summary of the source, at most ``max_tokens``."""
    candidate = ["Summary:", *_words(source_text)]
    words = candidate[:max_tokens]
    finish = "length" if len(candidate) > max_tokens else "stop"
    tokens = [word if i == 0 else f" {word}" for i, word in enumerate(words)]
    text = "".join(tokens)
    for marker in stop:
        cut = text.find(marker) if marker else -1
        if cut >= 0:
            # Keep only the tokens that end before the stop string, as a detokenizer would.
            kept: list[str] = []
            length = 0
            for token in tokens:
                if length + len(token) > cut:
                    break
                kept.append(token)
                length += len(token)
            tokens, text, finish = kept, "".join(kept), "stop"
    return tokens, text, finish


class OpenAIProtocolServer:
    """An OpenAI-compatible HTTP server answering like vLLM, on 127.0.0.1 (port 0: any free)."""

    def __init__(
        self,
        models: Iterable[str] = (DEFAULT_MODEL,),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_model_len: int = 2048,
        api_key: str | None = None,
        error_shape: Literal["nested", "flat"] = "nested",
        latency_s: float = 0.0,
    ) -> None:
        self.models = tuple(models)
        self.max_model_len = max_model_len
        self.api_key = api_key
        self.error_shape = error_shape
        self.latency_s = latency_s
        self.requests: deque[RecordedRequest] = deque(maxlen=10_000)
        self._lock = threading.Lock()
        self._faults: deque[_Fault] = deque()
        self._stopping = threading.Event()
        self._released = threading.Event()
        self._released.set()
        self._let_through: int | None = None
        """While holding: how many more generation requests are answered before the hold."""
        self._connections: set[socket.socket] = set()
        self._requests_total = 0
        self._in_flight = 0
        self._max_concurrency = 0
        self._created = int(time.time())
        self._httpd = _HTTPServer((host, port), _Handler, self)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as its base URL: the server's ``/v1``."""
        return f"{self.url}/v1"

    def start(self) -> OpenAIProtocolServer:
        if self._thread is not None:
            raise RuntimeError("the server is already running")
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"openai-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, end open connections and delayed answers, and join every thread."""
        self._stopping.set()
        self._released.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            # Wakes handler threads parked on an idle keep-alive connection.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._httpd.server_close()  # joins the handler threads (block_on_close)

    def __enter__(self) -> OpenAIProtocolServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ controls

    def fail_next(
        self,
        count: int,
        status: int = 503,
        *,
        retry_after: float | str | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next ``count`` generation requests with ``status`` (queued after others).

        ``retry_after`` (seconds, or an HTTP date string) is sent as the ``Retry-After`` header.
        """
        if count < 1:
            raise ValueError("count must be at least 1")
        header = None if retry_after is None else str(retry_after)
        text = message or f"injected fault: HTTP {status}"
        with self._lock:
            self._faults.append(_Fault(count, status, header, text))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset_stats(self) -> None:
        with self._lock:
            self._requests_total = 0
            self._max_concurrency = self._in_flight
            self.requests.clear()

    @property
    def requests_total(self) -> int:
        """Generation requests received (completions and chat), faults included."""
        with self._lock:
            return self._requests_total

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def max_concurrency(self) -> int:
        """The most generation requests being handled at the same time so far."""
        with self._lock:
            return self._max_concurrency

    # ------------------------------------------------------------------ internals

    def _register(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def _unregister(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _enter_generation(self) -> _Fault | None:
        with self._lock:
            self._requests_total += 1
            self._in_flight += 1
            self._max_concurrency = max(self._max_concurrency, self._in_flight)
            if not self._faults:
                return None
            fault = self._faults[0]
            fault.remaining -= 1
            if fault.remaining == 0:
                self._faults.popleft()
            return fault

    def _leave_generation(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def hold_after(self, count: int) -> None:
        """Answer the next ``count`` generation requests, then hold every later one (its
        connection stays open, unanswered) until :meth:`release` or :meth:`stop`."""
        if count < 0:
            raise ValueError(f"count must not be negative, got {count}")
        with self._lock:
            self._let_through = count
            self._released.clear()

    def release(self) -> None:
        """Answer every held request and stop holding."""
        with self._lock:
            self._let_through = None
            self._released.set()

    def _delay(self) -> None:
        with self._lock:
            held = self._let_through == 0
            if self._let_through:
                self._let_through -= 1
        if held:
            self._released.wait()
        if self.latency_s > 0:
            # An event, not time.sleep: stop() cuts every pending delay short.
            self._stopping.wait(self.latency_s)

    def _error_body(self, error: _RequestError) -> dict[str, Any]:
        info = {
            "message": error.message,
            "type": error.err_type,
            "param": error.param,
            "code": error.status,
        }
        if self.error_shape == "flat":
            return {"object": "error", **info}
        return {"error": info}

    def _check_model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if model is None:
            # vLLM serves its first served model name when the request names none.
            return self.models[0]
        if not isinstance(model, str) or model not in self.models:
            raise _RequestError(
                f"The model `{model}` does not exist.", status=404, err_type="NotFoundError"
            )
        return model

    @staticmethod
    def _int_field(body: dict[str, Any], name: str, default: int, minimum: int) -> int:
        value = body.get(name, default)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise _RequestError(
                f"{name} must be an integer >= {minimum}, got {value!r}", param=name
            )
        return value

    def _common(self, body: dict[str, Any]) -> tuple[str, int, list[str]]:
        model = self._check_model(body)
        if body.get("stream"):
            raise _RequestError("this protocol test server does not stream", param="stream")
        if body.get("n", 1) != 1:
            raise _RequestError("this protocol test server answers n=1 only", param="n")
        for name in ("temperature", "top_p"):
            value = body.get(name)
            if value is not None and (not isinstance(value, int | float) or value < 0):
                raise _RequestError(f"{name} must be a non-negative number", param=name)
        max_tokens = self._int_field(body, "max_tokens", 16, 1)
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _RequestError("stop must be a string or a list of strings", param="stop")
        return model, max_tokens, stop

    def _check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.max_model_len:
            raise _RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {prompt_tokens + max_tokens} tokens "
                f"({prompt_tokens} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.",
                param="max_tokens",
            )

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        model, max_tokens, stop = self._common(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _RequestError("prompt must be a string", param="prompt")
        logprobs = body.get("logprobs")
        if logprobs is not None:
            if not isinstance(logprobs, int) or isinstance(logprobs, bool) or logprobs < 0:
                raise _RequestError("logprobs must be a non-negative integer", param="logprobs")
            if logprobs > MAX_LOGPROBS:
                raise _RequestError(
                    f"Requested sample logprobs of {logprobs}, which is greater than max "
                    f"allowed: {MAX_LOGPROBS}",
                    param="logprobs",
                )
        prompt_tokens = len(_words(prompt))
        self._check_length(prompt_tokens, max_tokens)
        tokens, text, finish = _generate(prompt, max_tokens, stop)
        choice_logprobs: dict[str, Any] | None = None
        if logprobs is not None:
            values = [_logprob(token, i) for i, token in enumerate(tokens)]
            offsets, position = [], 0
            for token in tokens:
                offsets.append(position)
                position += len(token)
            choice_logprobs = {
                "text_offset": offsets,
                "token_logprobs": values,
                "tokens": tokens,
                # vLLM's completions API always includes the sampled token in the dict.
                "top_logprobs": [
                    dict(_alternatives(token, value, max(logprobs, 1)))
                    for token, value in zip(tokens, values, strict=True)
                ],
            }
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": choice_logprobs,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
            ],
            "usage": self._usage(prompt_tokens, len(tokens)),
        }

    def chat_completions(self, body: dict[str, Any]) -> dict[str, Any]:
        model, max_tokens, stop = self._common(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _RequestError("messages must be a non-empty list", param="messages")
        contents: list[str] = []
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise _RequestError("each message needs a role and content", param="messages")
            content = message.get("content")
            if not isinstance(content, str):
                raise _RequestError("message content must be a string", param="messages")
            contents.append(content)
        logprobs = body.get("logprobs", False)
        top_logprobs = body.get("top_logprobs")
        if top_logprobs is not None:
            if not isinstance(top_logprobs, int) or isinstance(top_logprobs, bool):
                raise _RequestError("top_logprobs must be an integer", param="top_logprobs")
            if top_logprobs < 0:
                raise _RequestError("`top_logprobs` must be a positive value.")
            if top_logprobs > 0 and not logprobs:
                raise _RequestError("when using `top_logprobs`, `logprobs` must be set to true.")
            if top_logprobs > MAX_LOGPROBS:
                raise _RequestError(
                    f"Requested sample logprobs of {top_logprobs}, which is greater than max "
                    f"allowed: {MAX_LOGPROBS}",
                    param="top_logprobs",
                )
        source = " ".join(contents)
        prompt_tokens = len(_words(source))
        self._check_length(prompt_tokens, max_tokens)
        tokens, text, finish = _generate(source, max_tokens, stop)
        choice_logprobs: dict[str, Any] | None = None
        if logprobs:
            content_logprobs = []
            for i, token in enumerate(tokens):
                value = _logprob(token, i)
                content_logprobs.append(
                    {
                        "token": token,
                        "logprob": value,
                        "bytes": list(token.encode()),
                        "top_logprobs": [
                            {"token": alt, "logprob": lp, "bytes": list(alt.encode())}
                            for alt, lp in _alternatives(token, value, top_logprobs or 0)
                        ],
                    }
                )
            choice_logprobs = {"content": content_logprobs}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "tool_calls": []},
                    "logprobs": choice_logprobs,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
            ],
            "usage": self._usage(prompt_tokens, len(tokens)),
        }

    def model_list(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": self._created,
                    "owned_by": "vllm",
                    "root": name,
                    "parent": None,
                    "max_model_len": self.max_model_len,
                    "permission": [],
                }
                for name in self.models
            ],
        }


class _HTTPServer(ThreadingHTTPServer):
    # Handler threads are joined on close (block_on_close) so no thread outlives a test.
    daemon_threads = False
    block_on_close = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        app: OpenAIProtocolServer,
    ) -> None:
        self.app = app
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (its timeout) closes the connection under us: not an error.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients with a connection pool expect
    server_version = "sluiceway-openai-protocol-server"
    timeout = 30.0  # an idle keep-alive connection is dropped after this long
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.app._register(self.connection)

    def finish(self) -> None:
        self.server.app._unregister(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet: tests assert on outcomes, not on access logs

    def _send_json(
        self, status: int, payload: Any, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        try:
            self.send_response(status)
            if payload is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise _RequestError(f"request body is not valid JSON: {exc}") from None

    def _authorized(self) -> bool:
        key = self.server.app.api_key
        return key is None or self.headers.get("Authorization") == f"Bearer {key}"

    def do_GET(self) -> None:
        app = self.server.app
        app.requests.append(
            RecordedRequest("GET", self.path, None, self.headers.get("Authorization"))
        )
        if self.path == "/health":
            self._send_json(200, None)
        elif self.path == "/v1/models":
            if not self._authorized():
                self._send_json(401, {"error": "Unauthorized"})
                return
            self._send_json(200, app.model_list())
        else:
            self._send_json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        app = self.server.app
        routes = {
            "/v1/completions": app.completions,
            "/v1/chat/completions": app.chat_completions,
        }
        try:
            body = self._read_body()
        except _RequestError as error:
            app.requests.append(RecordedRequest("POST", self.path, None, None))
            self._send_json(error.status, app._error_body(error))
            return
        app.requests.append(
            RecordedRequest("POST", self.path, body, self.headers.get("Authorization"))
        )
        route = routes.get(self.path)
        if route is None:
            self._send_json(404, {"detail": "Not Found"})
            return
        if not self._authorized():
            self._send_json(401, {"error": "Unauthorized"})
            return
        fault = app._enter_generation()
        try:
            app._delay()
            if fault is not None:
                injected = _RequestError(
                    fault.message,
                    status=fault.status,
                    err_type="TooManyRequests" if fault.status == 429 else "ServiceUnavailable",
                )
                extra = [] if fault.retry_after is None else [("Retry-After", fault.retry_after)]
                self._send_json(fault.status, app._error_body(injected), extra)
                return
            if not isinstance(body, dict):
                raise _RequestError("the request body must be a JSON object")
            self._send_json(200, route(body))
        except _RequestError as error:
            self._send_json(error.status, app._error_body(error))
        finally:
            app._leave_generation()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devkit.servers.openai_server",
        description="Protocol test server answering like vLLM's OpenAI-compatible API "
        "(fake, deterministic generation; not vLLM).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--model", action="append", help="served model name (repeatable)", default=None
    )
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--latency-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    server = OpenAIProtocolServer(
        args.model or [DEFAULT_MODEL],
        host=args.host,
        port=args.port,
        max_model_len=args.max_model_len,
        api_key=args.api_key,
        latency_s=args.latency_s,
    )
    done = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with server:
        print(
            f"openai protocol test server on {server.base_url} serving {', '.join(server.models)}",
            flush=True,
        )
        done.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
