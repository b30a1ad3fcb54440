"""The HTTP edge of ``sluiceway api`` (aiohttp): routes, authentication, request parsing and
OpenAI's error shape. What each route does is :class:`workers.api.service.ApiService`, run in a
thread (its object-store calls block).

Every answer that is not a success is ``{"error": {message, type, param, code}}`` with its
status, including unknown routes, wrong methods and unexpected failures (logged, never shown).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from pipeline.settings import Settings
from schemas.errors import SluicewayError
from workers.api.openai_format import ApiError
from workers.api.paging import page_request
from workers.api.service import ApiService
from workers.api.tenants import KeyRing, Tenant, check_file_size

log = logging.getLogger(__name__)

T = TypeVar("T")
_READ_CHUNK = 256 * 1024
_MAX_FORM_FIELD = 1024
_MAX_FILENAME = 255
_MAX_JSON_BODY = 64 * 1024
_MULTIPART_OVERHEAD = 64 * 1024
"""Room for the multipart framing and small fields around the file in ``Content-Length``."""
_SERVICE = web.AppKey("service", ApiService)
_KEYS = web.AppKey("keys", KeyRing)


def build_app(settings: Settings, service: ApiService | None = None) -> web.Application:
    app = web.Application(middlewares=[_openai_errors], client_max_size=_MAX_JSON_BODY)
    app[_SERVICE] = service or ApiService(settings)
    app[_KEYS] = KeyRing(settings.api.tenants)
    app.router.add_post("/v1/files", upload_file)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{file_id}", get_file)
    app.router.add_delete("/v1/files/{file_id}", delete_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", get_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
    return app


@web.middleware
async def _openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return web.json_response(error.body(), status=error.status)
    except web.HTTPException as error:
        # aiohttp's own answers (unknown route 404, wrong method 405, body too large 413).
        if error.status < 400:
            raise
        code = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}
        message = f"{error.reason}: {request.method} {request.path[:200]}"
        answer = ApiError(error.status, message, code=code.get(error.status))
        return web.json_response(answer.body(), status=error.status)
    except SluicewayError as error:
        log.error('api request failed path="%s" error="%s"', request.path, error)
        return _server_error()
    except Exception:
        log.exception('api request failed path="%s"', request.path)
        return _server_error()


def _server_error() -> web.Response:
    answer = ApiError(500, "The server could not complete the request.", code="server_error")
    return web.json_response(answer.body(), status=500)


def _tenant(request: web.Request) -> Tenant:
    return request.app[_KEYS].tenant(request.headers.get("Authorization"))


async def _run(request: web.Request, work: Callable[[ApiService], T]) -> T:
    return await asyncio.to_thread(work, request.app[_SERVICE])


# -------------------------------------------------------------------------------- files


async def upload_file(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    declared = request.content_length
    if declared is not None:
        check_file_size(tenant, max(declared - _MULTIPART_OVERHEAD, 0))
    if not request.content_type.startswith("multipart/"):
        raise ApiError(400, "Upload a file as multipart/form-data (fields file and purpose).")
    with tempfile.TemporaryDirectory(prefix="sluiceway-upload-") as scratch:
        content = Path(scratch) / "upload.jsonl"
        purpose, filename = await _read_upload(request, tenant, content)
        if purpose != "batch":
            raise ApiError(400, "purpose must be 'batch'.", param="purpose", code="invalid_value")
        if filename is None:
            raise ApiError(400, "The form has no file field.", param="file")
        created = await _run(
            request, lambda service: service.add_file(tenant, content, filename, purpose)
        )
    return web.json_response(created)


async def _read_upload(
    request: web.Request, tenant: Tenant, content: Path
) -> tuple[str | None, str | None]:
    """The form's purpose and the file's name; the file itself streamed to ``content``."""
    with _form_errors():
        reader = await request.multipart()
    purpose: str | None = None
    filename: str | None = None
    while True:
        with _form_errors():
            part = await reader.next()
        if part is None:
            return purpose, filename
        if not isinstance(part, BodyPartReader):
            raise ApiError(400, "Nested multipart forms are not accepted.")
        if part.name == "file":
            if filename is not None:
                raise ApiError(400, "The form has two file fields.", param="file")
            filename = _safe_filename(part.filename)
            await _save_part(part, tenant, content)
        elif part.name == "purpose":
            purpose = await _small_field(part, "purpose")
        else:
            await _small_field(part, str(part.name)[:40])


@contextmanager
def _form_errors() -> Iterator[None]:
    """What aiohttp raises for a malformed form (bad framing, headers, encodings) -> 400."""
    try:
        yield
    except (ValueError, AssertionError, RuntimeError, KeyError, HttpProcessingError) as exc:
        raise ApiError(400, f"Not a readable multipart form: {str(exc)[:200]}.") from None


async def _save_part(part: BodyPartReader, tenant: Tenant, content: Path) -> None:
    size = 0
    with content.open("wb") as out:
        while True:
            with _form_errors():
                chunk = await part.read_chunk(_READ_CHUNK)
            if not chunk:
                return
            size += len(chunk)
            check_file_size(tenant, size)
            out.write(chunk)


async def _small_field(part: BodyPartReader, name: str) -> str:
    data = bytearray()
    while True:
        with _form_errors():
            chunk = await part.read_chunk(_MAX_FORM_FIELD)
        if not chunk:
            break
        data += chunk
        if len(data) > _MAX_FORM_FIELD:
            raise ApiError(400, f"Form field {name!r} is too long.", param=name)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ApiError(400, f"Form field {name!r} is not UTF-8 text.", param=name) from None


def _safe_filename(name: str | None) -> str:
    """The file's name as given, kept only as a label: never a path (its last segment,
    printable, bounded)."""
    base = (name or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(ch for ch in base if ch.isprintable())[:_MAX_FILENAME]
    return cleaned if cleaned not in ("", ".", "..") else "upload.jsonl"


async def list_files(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    wanted = page_request(request.query, orderable=True)
    purpose = request.query.get("purpose")
    listed = await _run(request, lambda service: service.files(tenant, wanted, purpose))
    return web.json_response(listed)


async def get_file(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    file_id = request.match_info["file_id"]
    return web.json_response(await _run(request, lambda service: service.file(tenant, file_id)))


async def delete_file(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    file_id = request.match_info["file_id"]
    deleted = await _run(request, lambda service: service.delete_file(tenant, file_id))
    return web.json_response(deleted)


async def file_content(request: web.Request) -> web.StreamResponse:
    tenant = _tenant(request)
    file_id = request.match_info["file_id"]
    chunks = await _run(request, lambda service: service.file_content(tenant, file_id))
    response = web.StreamResponse(headers={"Content-Type": "application/jsonl"})
    await response.prepare(request)
    while True:
        chunk = await asyncio.to_thread(_next_chunk, chunks)
        if chunk is None:
            break
        await response.write(chunk)
    await response.write_eof()
    return response


def _next_chunk(chunks: Iterator[bytes]) -> bytes | None:
    return next(chunks, None)


# ------------------------------------------------------------------------------ batches


async def create_batch(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    body = await _json_object(request)
    key = request.headers.get("Idempotency-Key")
    created = await _run(request, lambda service: service.create_batch(tenant, body, key))
    return web.json_response(created)


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "The request body is too large.", code="request_too_large") from None
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "The request body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


async def list_batches(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    wanted = page_request(request.query, orderable=False)
    return web.json_response(await _run(request, lambda service: service.batches(tenant, wanted)))


async def get_batch(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    batch_id = request.match_info["batch_id"]
    return web.json_response(await _run(request, lambda service: service.batch(tenant, batch_id)))


async def cancel_batch(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    batch_id = request.match_info["batch_id"]
    return web.json_response(await _run(request, lambda service: service.cancel(tenant, batch_id)))


# ------------------------------------------------------------------------------ serving


async def serve(settings: Settings, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    if not settings.api.tenants:
        raise SluicewayError("api.tenants names no tenant: no key could call the API")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(build_app(settings), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info('api serving host="%s" port="%s"', host, port)
        await stop.wait()
    finally:
        await runner.cleanup()
