"""A tiny in-memory Confluent Schema Registry, for tests.

No real Confluent Schema Registry can be downloaded in this environment (it is not on Maven
Central), so this server implements the subset of its REST API that
``confluent_kafka.schema_registry.SchemaRegistryClient`` uses for Avro, written from
Confluent's public API reference (docs.confluent.io, "Schema Registry API Reference"):

* ``POST /subjects/{subject}/versions``  register; an identical schema keeps its id, and
  ids are global (the same schema under two subjects has one id) -> ``{"id": n}``
* ``POST /subjects/{subject}``           look a schema up in a subject -> subject, id, version,
  schema; 40401 subject not found, 40403 schema not found
* ``GET /schemas/ids/{id}``              -> ``{"schema": "..."}``; 40403 schema not found
* ``GET /subjects``, ``GET /subjects/{subject}/versions``,
  ``GET /subjects/{subject}/versions/{version|latest}``
* ``GET|PUT /config`` and ``/config/{subject}``: compatibility level (stored, not enforced)

Errors are ``{"error_code": n, "message": "..."}`` with the matching HTTP status. Setting
:attr:`SchemaRegistryServer.fail_status` makes every request answer that status (outage
tests). It binds 127.0.0.1 on a random free port and serves from a daemon thread.
"""

from __future__ import annotations

import json
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.schemas: list[str] = []  # id - 1 -> schema string
        self.subjects: dict[str, list[int]] = {}  # subject -> ids by version - 1
        self.config: dict[str, str] = {"": "BACKWARD"}
        self.fail_status: int | None = None
        self.requests: list[tuple[str, str]] = []

    def id_for(self, schema: str) -> int | None:
        wanted = json.loads(schema)
        for index, known in enumerate(self.schemas):
            if json.loads(known) == wanted:
                return index + 1
        return None


class _Error(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        return

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        state = self.server.state
        path = urlsplit(self.path).path
        state.requests.append((method, path))
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        try:
            if state.fail_status is not None:
                raise _Error(state.fail_status, state.fail_status * 100, "injected failure")
            with state.lock:
                status, payload = self._route(method, path, body, state)
        except _Error as exc:
            status, payload = exc.status, {"error_code": exc.code, "message": exc.message}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str, path: str, body: Any, state: _State) -> tuple[int, Any]:
        ok = HTTPStatus.OK
        if m := re.fullmatch(r"/schemas/ids/(\d+)", path):
            schema_id = int(m.group(1))
            if method == "GET" and 1 <= schema_id <= len(state.schemas):
                return ok, {"schema": state.schemas[schema_id - 1]}
            raise _Error(404, 40403, "Schema not found")
        if path == "/subjects" and method == "GET":
            return ok, sorted(state.subjects)
        if m := re.fullmatch(r"/subjects/([^/]+)/versions", path):
            subject = unquote(m.group(1))
            if method == "POST":
                return ok, {"id": self._register(state, subject, body)}
            if subject not in state.subjects:
                raise _Error(404, 40401, "Subject not found")
            return ok, list(range(1, len(state.subjects[subject]) + 1))
        if m := re.fullmatch(r"/subjects/([^/]+)/versions/([^/]+)", path):
            subject, version = unquote(m.group(1)), m.group(2)
            ids = state.subjects.get(subject)
            if not ids:
                raise _Error(404, 40401, "Subject not found")
            number = len(ids) if version in ("latest", "-1") else int(version)
            if not 1 <= number <= len(ids):
                raise _Error(404, 40402, "Version not found")
            return ok, self._registered(state, subject, number)
        if m := re.fullmatch(r"/subjects/([^/]+)", path):
            subject = unquote(m.group(1))
            if method != "POST":
                raise _Error(405, 405, "Method not allowed")
            if subject not in state.subjects:
                raise _Error(404, 40401, "Subject not found")
            schema_id = state.id_for(self._schema_of(body))
            if schema_id is None or schema_id not in state.subjects[subject]:
                raise _Error(404, 40403, "Schema not found")
            return ok, self._registered(
                state, subject, state.subjects[subject].index(schema_id) + 1
            )
        if m := re.fullmatch(r"/config(?:/([^/]+))?", path):
            key = unquote(m.group(1) or "")
            if method == "PUT":
                state.config[key] = str(body["compatibility"]).upper()
                return ok, {"compatibility": state.config[key]}
            level = state.config.get(key) or state.config[""]
            return ok, {"compatibilityLevel": level}
        raise _Error(404, 404, f"no route for {method} {path}")

    @staticmethod
    def _schema_of(body: Any) -> str:
        if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
            raise _Error(422, 42201, "Invalid schema")
        if body.get("schemaType", "AVRO") != "AVRO":
            raise _Error(422, 42201, "Only AVRO schemas are supported here")
        try:
            json.loads(body["schema"])
        except ValueError:
            raise _Error(422, 42201, "Invalid schema") from None
        return str(body["schema"])

    @staticmethod
    def _register(state: _State, subject: str, body: Any) -> int:
        schema = _Handler._schema_of(body)
        schema_id = state.id_for(schema)
        if schema_id is None:
            state.schemas.append(schema)
            schema_id = len(state.schemas)
        ids = state.subjects.setdefault(subject, [])
        if schema_id not in ids:
            ids.append(schema_id)
        return schema_id

    @staticmethod
    def _registered(state: _State, subject: str, version: int) -> dict[str, Any]:
        schema_id = state.subjects[subject][version - 1]
        return {
            "subject": subject,
            "version": version,
            "id": schema_id,
            "schema": state.schemas[schema_id - 1],
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: _State) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


class SchemaRegistryServer:
    """Context manager: ``with SchemaRegistryServer() as registry: registry.url``."""

    def __init__(self) -> None:
        self.state = _State()
        self._server = _Server(self.state)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def fail_status(self) -> int | None:
        return self.state.fail_status

    @fail_status.setter
    def fail_status(self, status: int | None) -> None:
        self.state.fail_status = status

    def register(self, subject: str, schema: str) -> int:
        """Register directly (as another producer would), bypassing HTTP."""
        with self.state.lock:
            return _Handler._register(self.state, subject, {"schema": schema})

    def __enter__(self) -> SchemaRegistryServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
