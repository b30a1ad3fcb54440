"""A protocol test server for the subset of SAP S/4HANA OData the SAP connector uses. It is not SAP.

No SAP system is reachable from the development machines, so the SAP connector is verified
against this server, built from SAP's and OData's public documentation of the behaviour the
connector depends on. It serves one entity type, supplier invoices, twice:

- OData v2 at ``/sap/opu/odata/sap/API_SUPPLIERINVOICE_PROCESS_SRV/A_SupplierInvoice``:
  ``{"d": {...}}`` / ``{"d": {"results": [...], "__next": ...}}`` envelopes, ``__metadata``
  with ``uri``, ``type`` and ``etag``, ``Edm.DateTime`` as ``/Date(ms)/``,
  ``Edm.DateTimeOffset`` as ``/Date(ms+0000)/``, ``Edm.Decimal`` as strings, errors as
  ``{"error": {"code", "message": {"lang", "value"}}}``;
- OData v4 at ``/sap/opu/odata4/sap/api_supplierinvoice/srvd_a2x/sap/supplierinvoice/0001/
  SupplierInvoice`` (an illustrative path): bare entities with ``@odata.etag``,
  ``{"value": [...], "@odata.nextLink": <relative>}``, ISO 8601 dates, decimals as numbers.

What it implements:

- entity reads by key predicate ``(SupplierInvoice='..',FiscalYear='..')``, 404 if unknown;
- collection reads with ``$filter`` (comparisons joined by ``and``; v2 ``datetime'..'`` /
  ``datetimeoffset'..'`` and v4 bare ISO literals, strings, numbers), ``$orderby``, ``$top``,
  and server-driven paging (``page_size`` per response, ``$skiptoken`` in the next link);
- updates: ``PATCH`` (v4), ``MERGE`` (v2, also tunnelled as ``POST`` + ``X-HTTP-Method``),
  requiring ``If-Match`` (428 without, 412 on a stale ETag); a write changes the ETag and
  ``LastChangeDateTime`` as in SAP;
- a function import (v2 ``POST .../Release?SupplierInvoice='..'&FiscalYear='..'``) and a
  bound action (v4 ``POST .../SupplierInvoice(...)/SAP__self.Release``);
- CSRF: ``x-csrf-token: Fetch`` on a GET returns a token bound to a session cookie; a
  modifying call without the matching token and cookie gets 403 with
  ``x-csrf-token: Required`` (:meth:`expire_csrf_tokens` invalidates every token now,
  :meth:`expire_csrf_tokens_after_writes` at the moment the N-th write is accepted; every
  refusal is recorded in :attr:`SapProtocolServer.csrf_rejections`);
- auth: basic, or a bearer token from ``POST /oauth/token`` (client credentials); 401 with
  ``WWW-Authenticate`` otherwise;
- :meth:`fail_next`: the next N matching calls answer 429/503 with ``Retry-After``;
- :meth:`hold_reads_after`: reads after the first N wait until :meth:`release_reads` (a
  client caught in the middle of its work, deterministically).

:func:`push_events` delivers CloudEvents to a receiver the way an event broker's webhook
does: one POST per event, redelivered until the receiver answers 2xx.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode

import httpx2
from aiohttp import web

from schemas.identity import request_id_for

V2_SERVICE = "/sap/opu/odata/sap/API_SUPPLIERINVOICE_PROCESS_SRV"
V2_ENTITY_SET = "A_SupplierInvoice"
V4_SERVICE = "/sap/opu/odata4/sap/api_supplierinvoice/srvd_a2x/sap/supplierinvoice/0001"
V4_ENTITY_SET = "SupplierInvoice"
EVENT_TYPE_CREATED = "sap.s4.beh.supplierinvoice.v1.SupplierInvoice.Created.v1"
EVENT_TYPE_CHANGED = "sap.s4.beh.supplierinvoice.v1.SupplierInvoice.Changed.v1"
EVENT_TYPE_CANCELED = "sap.s4.beh.supplierinvoice.v1.SupplierInvoice.Canceled.v1"
"""SAP's business event when a supplier invoice is cancelled (reversed); the document stays
readable, flagged as reversed."""
EVENT_SOURCE = "/default/sap.s4.beh/S4HCLNT100"
SESSION_COOKIE = "SAP_SESSIONID_S4H_100"
RELEASE_PARAMETERS = {"Note": "Edm.String", "Approved": "Edm.Boolean", "RiskScore": "Edm.Decimal"}
"""The v2 function import ``Release``'s parameters and their types (as its $metadata says)."""

# Property types as in the service's metadata; what decides each one's JSON form.
_DATE_TIME = {"DocumentDate", "PostingDate", "DueCalculationBaseDate"}  # Edm.DateTime / Edm.Date
_DATE_TIME_OFFSET = {"LastChangeDateTime"}
_DECIMAL = {"InvoiceGrossAmount", "YY1_RiskScore"}
_UPDATABLE = {"YY1_RiskScore", "YY1_RiskRequestId", "PaymentBlockingReason"}
_PREDICATE_PART = re.compile(r"(\w+)=('(?:[^']|'')*'|[^,()]+)")
_COMPARISON = re.compile(
    r"^\s*(\w+)\s+(eq|ne|gt|ge|lt|le)\s+(datetime'[^']*'|datetimeoffset'[^']*'|'(?:[^']|'')*'|\S+)\s*$"
)

InvoiceKey = tuple[str, str]


class _ODataFailure(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass
class Write:
    """One accepted modifying call, as the server saw it."""

    key: InvoiceKey
    method: str
    body: dict[str, Any]
    version: int


@dataclass(frozen=True)
class Call:
    """One request as it arrived (before authentication, CSRF or any failure)."""

    method: str
    path: str
    key: InvoiceKey | None


@dataclass
class CsrfRejection:
    """One modifying call refused with 403 ``x-csrf-token: Required``."""

    method: str
    path: str
    key: InvoiceKey | None
    """The invoice the call was for (``None`` for a call that names none)."""
    writes_before: int
    """How many writes the server had accepted when it refused this call."""


@dataclass
class _Failure:
    status: int
    remaining: int
    retry_after: str | None
    methods: frozenset[str] | None


@dataclass
class _Invoice:
    properties: dict[str, Any]
    version: int = 1
    actions: list[str] = field(default_factory=list)

    @property
    def etag(self) -> str:
        digest = hashlib.sha1(  # noqa: S324 - an ETag, not security
            f"{self.properties['SupplierInvoice']}:{self.version}".encode()
        ).hexdigest()[:16]
        return f"W/\"'{digest}'\""


def _epoch_ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def _as_datetime(value: date | datetime) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime(value.year, value.month, value.day, tzinfo=UTC)


class SapProtocolServer:
    """Serves supplier invoices over OData v2 and v4 on ``127.0.0.1``, in a thread."""

    def __init__(
        self,
        *,
        username: str = "sluiceway",
        password: str = "sap-test-password",  # noqa: S107 - the test system's fixed login
        oauth_clients: dict[str, str] | None = None,
        page_size: int = 50,
        port: int = 0,
    ) -> None:
        self.username = username
        self.password = password
        self.oauth_clients = oauth_clients or {"sluiceway-client": "sap-test-client-secret"}
        self.page_size = page_size
        self._port = port
        self._lock = threading.Lock()
        self._invoices: dict[InvoiceKey, _Invoice] = {}
        self._tokens: dict[str, str] = {}  # session id -> CSRF token
        self._bearers: set[str] = set()
        self._failures: list[_Failure] = []
        self.writes: list[Write] = []
        self.calls: list[Call] = []
        """Every request but token requests, accepted or not, in arrival order."""
        self.reads = 0
        self.collection_queries: list[dict[str, str]] = []
        """The query options of every collection read, in order."""
        self.csrf_fetches = 0
        self.csrf_rejections: list[CsrfRejection] = []
        self._expire_csrf_after: int | None = None
        self.csrf_expired_at_write: int | None = None
        """The number of accepted writes when :meth:`expire_csrf_tokens_after_writes` fired."""
        self.csrf_fetches_at_expiry: int | None = None
        self._hold_reads_after: int | None = None
        self._reads_admitted = 0
        self._reads_released: asyncio.Event | None = None
        self.held_reads = 0
        """Reads that waited (or wait) at the :meth:`hold_reads_after` gate."""
        self.requests_by_status: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()

    # ------------------------------------------------------------------ data

    def add_invoice(self, **properties: Any) -> InvoiceKey:
        """Store an invoice (Python values: str, int, Decimal/float, date, datetime)."""
        defaults: dict[str, Any] = {
            "CompanyCode": "1010",
            "FiscalYear": "2024",
            "DocumentCurrency": "EUR",
            "InvoiceGrossAmount": Decimal("100.00"),
            "NetPaymentDays": 30,
            "DueCalculationBaseDate": date(2024, 5, 1),
            "DocumentDate": date(2024, 5, 1),
            "PostingDate": date(2024, 5, 1),
            "InvoicingParty": "17300001",
            "SupplierInvoiceOrigin": "5",
            "PaymentBlockingReason": "",
            "LastChangeDateTime": datetime.now(UTC),
            "YY1_RiskScore": Decimal("0"),
            "YY1_RiskRequestId": "",
        }
        merged = {**defaults, **properties}
        key = (str(merged["SupplierInvoice"]), str(merged["FiscalYear"]))
        with self._lock:
            self._invoices[key] = _Invoice(merged)
        return key

    def invoice(self, key: InvoiceKey) -> dict[str, Any]:
        with self._lock:
            return dict(self._invoices[key].properties)

    def actions(self, key: InvoiceKey) -> list[str]:
        with self._lock:
            return list(self._invoices[key].actions)

    def writes_by_key(self) -> dict[InvoiceKey, list[Write]]:
        with self._lock:
            grouped: dict[InvoiceKey, list[Write]] = {}
            for write in self.writes:
                grouped.setdefault(write.key, []).append(write)
            return grouped

    def fail_next(
        self,
        status: int,
        count: int = 1,
        *,
        retry_after: str | None = None,
        methods: Iterable[str] | None = None,
    ) -> None:
        """Answer the next ``count`` calls (of ``methods``, default any) with ``status``."""
        with self._lock:
            self._failures.append(
                _Failure(status, count, retry_after, frozenset(methods) if methods else None)
            )

    def expire_csrf_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    def expire_csrf_tokens_after_writes(self, count: int) -> None:
        """Invalidate every CSRF token at the moment the ``count``-th write (in all) is
        accepted, once: every modifying call after it needs a token fetched again."""
        with self._lock:
            self._expire_csrf_after = count
            self._expire_csrf_if_due()

    def _expire_csrf_if_due(self) -> None:  # with self._lock held
        if self._expire_csrf_after is not None and len(self.writes) >= self._expire_csrf_after:
            self._expire_csrf_after = None
            self._tokens.clear()
            self.csrf_expired_at_write = len(self.writes)
            self.csrf_fetches_at_expiry = self.csrf_fetches

    def hold_reads_after(self, count: int) -> None:
        """Let ``count`` more entity and collection reads through; hold every later one
        (unanswered) until :meth:`release_reads`."""
        with self._lock:
            self._reads_admitted = 0
            self._hold_reads_after = count

    def release_reads(self) -> None:
        """Answer the held reads and hold no more."""
        with self._lock:
            self._hold_reads_after = None
        if self._loop is not None and self._reads_released is not None:
            self._loop.call_soon_threadsafe(self._reads_released.set)

    async def _wait_if_held(self) -> None:
        with self._lock:
            if self._hold_reads_after is None:
                return
            if self._reads_admitted < self._hold_reads_after:
                self._reads_admitted += 1
                return
            self.held_reads += 1
        assert self._reads_released is not None
        await self._reads_released.wait()

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> SapProtocolServer:
        if self._port == 0:
            self._port = free_port()
        self._thread = threading.Thread(target=self._serve, name="sap-server", daemon=True)
        self._thread.start()
        if not self._started.wait(15):
            raise RuntimeError("the SAP protocol server did not start within 15s")
        return self

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._reads_released = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        loop.run_until_complete(site.start())
        self._started.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def stop(self) -> None:
        self.release_reads()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> SapProtocolServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ HTTP

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        version = 4 if request.path.startswith(V4_SERVICE) else 2
        try:
            response = await self._route(request, version)
        except _ODataFailure as failure:
            response = self._error(failure, version)
        with self._lock:
            self.requests_by_status[response.status] = (
                self.requests_by_status.get(response.status, 0) + 1
            )
        return response

    async def _route(self, request: web.Request, version: int) -> web.StreamResponse:
        method = request.method
        if method == "POST" and request.headers.get("X-HTTP-Method"):
            method = request.headers["X-HTTP-Method"].upper()
        if request.path == "/oauth/token" and method == "POST":
            return await self._token(request)
        self._record_call(request, method, version)
        self._authenticate(request)
        self._maybe_fail(method)
        service = V4_SERVICE if version == 4 else V2_SERVICE
        entity_set = V4_ENTITY_SET if version == 4 else V2_ENTITY_SET
        if not request.path.startswith(service):
            raise _ODataFailure(404, "/IWFND/MED/170", f"No service found for {request.path}")
        rest = unquote(request.path[len(service) :]).lstrip("/")
        session = request.cookies.get(SESSION_COOKIE)
        fetch = request.headers.get("x-csrf-token", "").lower() == "fetch"
        token_headers: dict[str, str] = {}
        if fetch and method == "GET":
            token_headers, session = self._issue_token(session)
        if method in ("PATCH", "MERGE", "POST", "PUT", "DELETE"):
            self._check_csrf(request, session, method, rest, entity_set)
        if method == "GET" and rest != "":
            await self._wait_if_held()
        if rest == "" and method == "GET":
            body = (
                {"d": {"EntitySets": [entity_set]}}
                if version == 2
                else {"@odata.context": "$metadata", "value": [{"name": entity_set}]}
            )
            return self._json(body, headers=token_headers)
        if rest == entity_set and method == "GET":
            return self._json(self._collection(request, version, entity_set), headers=token_headers)
        if rest.startswith(entity_set + "("):
            key_text, _, action = rest[len(entity_set) :].partition(")/")
            key = _parse_key(key_text)
            if action:
                if method != "POST":
                    raise _ODataFailure(405, "METHOD_NOT_ALLOWED", "actions are POSTed")
                return self._action(key, action, await _json_body(request), version)
            if method == "GET":
                return self._read(key, version, token_headers)
            if (version == 2 and method in ("MERGE", "PATCH")) or (
                version == 4 and method == "PATCH"
            ):
                return self._update(key, request, await _json_body(request), method, version)
            raise _ODataFailure(405, "METHOD_NOT_ALLOWED", f"{method} is not allowed here")
        if version == 2 and rest == "Release" and method == "POST":
            params = dict(request.query)
            key = (
                _literal(params.get("SupplierInvoice", "")),
                _literal(params.get("FiscalYear", "")),
            )
            arguments = {
                name: _typed_literal(name, params[name], kind)
                for name, kind in RELEASE_PARAMETERS.items()
                if name in params
            }
            return self._action(key, "Release", arguments, version)
        raise _ODataFailure(404, "/IWBEP/CM_MGW_RT/020", f"Resource not found for segment '{rest}'")

    def _record_call(self, request: web.Request, method: str, version: int) -> None:
        service = V4_SERVICE if version == 4 else V2_SERVICE
        entity_set = V4_ENTITY_SET if version == 4 else V2_ENTITY_SET
        rest = unquote(request.path[len(service) :]).lstrip("/")
        with self._lock:
            self.calls.append(Call(method, request.path, _key_of(request, rest, entity_set)))

    def modifying_calls(self, key: InvoiceKey | None = None) -> list[Call]:
        """Calls that could change data (any method but GET/HEAD), of ``key`` or of all."""
        with self._lock:
            return [
                call
                for call in self.calls
                if call.method not in ("GET", "HEAD") and (key is None or call.key == key)
            ]

    # -- auth, CSRF, failures

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        client_id, secret = _basic_pair(request.headers.get("Authorization", ""))
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if client_id is None or self.oauth_clients.get(client_id) != secret:
            return web.json_response({"error": "invalid_client"}, status=401)
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._bearers.add(token)
        return web.json_response(
            {"access_token": token, "token_type": "bearer", "expires_in": 3600}
        )

    def _authenticate(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            with self._lock:
                if header[7:] in self._bearers:
                    return
        else:
            user, password = _basic_pair(header)
            if user == self.username and password == self.password:
                return
        raise _ODataFailure(
            401,
            "UNAUTHORIZED",
            "Logon failed",
            {"WWW-Authenticate": 'Basic realm="SAP NetWeaver Application Server [S4H/100]"'},
        )

    def _maybe_fail(self, method: str) -> None:
        with self._lock:
            for failure in self._failures:
                if failure.remaining > 0 and (failure.methods is None or method in failure.methods):
                    failure.remaining -= 1
                    headers = {"Retry-After": failure.retry_after} if failure.retry_after else {}
                    raise _ODataFailure(failure.status, "SERVICE_BUSY", "try again", headers)

    def _issue_token(self, session: str | None) -> tuple[dict[str, str], str]:
        with self._lock:
            self.csrf_fetches += 1
            session = session or secrets.token_hex(16)
            token = self._tokens.setdefault(session, secrets.token_urlsafe(18))
        return {"x-csrf-token": token, "Set-Cookie": f"{SESSION_COOKIE}={session}; path=/"}, session

    def _check_csrf(
        self, request: web.Request, session: str | None, method: str, rest: str, entity_set: str
    ) -> None:
        sent = request.headers.get("x-csrf-token")
        with self._lock:
            expected = self._tokens.get(session or "")
            refused = expected is None or sent != expected
            if refused:
                self.csrf_rejections.append(
                    CsrfRejection(
                        method, request.path, _key_of(request, rest, entity_set), len(self.writes)
                    )
                )
        if refused:
            raise _ODataFailure(
                403, "CSRF", "CSRF token validation failed", {"x-csrf-token": "Required"}
            )

    # -- reads

    def _read(self, key: InvoiceKey, version: int, headers: dict[str, str]) -> web.Response:
        with self._lock:
            self.reads += 1
            invoice = self._invoices.get(key)
            if invoice is None:
                raise _ODataFailure(404, "/IWBEP/CM_MGW_RT/021", f"Resource not found for {key}")
            entity = self._render(invoice, version)
        body = (
            {"d": entity}
            if version == 2
            else {"@odata.context": "$metadata#SupplierInvoice/$entity", **entity}
        )
        return self._json(body, headers={**headers, "ETag": invoice.etag})

    def _collection(self, request: web.Request, version: int, entity_set: str) -> dict[str, Any]:
        query = dict(parse_qsl(request.query_string, keep_blank_values=True))
        with self._lock:
            self.reads += 1
            self.collection_queries.append(query)
            invoices = list(self._invoices.values())
            matches = [i for i in invoices if _matches(i.properties, query.get("$filter"))]
            matches.sort(key=lambda i: _order_key(i.properties, query.get("$orderby")))
            top = int(query["$top"]) if "$top" in query else len(matches)
            start = int(query.get("$skiptoken", "0")) + int(query.get("$skip", "0"))
            end = min(start + self.page_size, top, len(matches))
            page = [self._render(i, version) for i in matches[start:end]]
        more = end < min(top, len(matches))
        following = {k: v for k, v in query.items() if k not in ("$skiptoken", "$skip")}
        following["$skiptoken"] = str(end)
        if version == 2:
            body: dict[str, Any] = {"results": page}
            if more:
                query_text = urlencode(following, quote_via=quote)
                body["__next"] = f"{self.base_url}{V2_SERVICE}/{entity_set}?{query_text}"
            return {"d": body}
        result: dict[str, Any] = {"@odata.context": f"$metadata#{entity_set}", "value": page}
        if more:
            result["@odata.nextLink"] = f"{entity_set}?{urlencode(following, quote_via=quote)}"
        return result

    def _render(self, invoice: _Invoice, version: int) -> dict[str, Any]:
        entity: dict[str, Any] = {}
        for name, value in invoice.properties.items():
            entity[name] = _render_value(name, value, version)
        number, year = invoice.properties["SupplierInvoice"], invoice.properties["FiscalYear"]
        key = f"SupplierInvoice='{number}',FiscalYear='{year}'"
        if version == 2:
            uri = f"{self.base_url}{V2_SERVICE}/{V2_ENTITY_SET}({key})"
            entity["__metadata"] = {
                "id": uri,
                "uri": uri,
                "type": "API_SUPPLIERINVOICE_PROCESS_SRV.A_SupplierInvoiceType",
                "etag": invoice.etag,
            }
        else:
            entity["@odata.etag"] = invoice.etag
        return entity

    # -- writes

    def _update(
        self, key: InvoiceKey, request: web.Request, body: dict[str, Any], method: str, version: int
    ) -> web.Response:
        if_match = request.headers.get("If-Match")
        with self._lock:
            invoice = self._invoices.get(key)
            if invoice is None:
                raise _ODataFailure(404, "/IWBEP/CM_MGW_RT/021", f"Resource not found for {key}")
            if if_match is None:
                raise _ODataFailure(428, "PRECONDITION_REQUIRED", "If-Match header is required")
            if if_match != "*" and if_match != invoice.etag:
                raise _ODataFailure(412, "PRECONDITION_FAILED", "The entity was changed meanwhile")
            unknown = sorted(set(body) - _UPDATABLE)
            if unknown:
                raise _ODataFailure(400, "PROPERTY_NOT_UPDATABLE", f"cannot update {unknown}")
            for name, value in body.items():
                invoice.properties[name] = Decimal(str(value)) if name in _DECIMAL else value
            invoice.version += 1
            invoice.properties["LastChangeDateTime"] = datetime.now(UTC)
            self.writes.append(Write(key, method, dict(body), invoice.version))
            self._expire_csrf_if_due()
            etag = invoice.etag
        return web.Response(status=204, headers={"ETag": etag})

    def _action(
        self, key: InvoiceKey, action: str, body: dict[str, Any], version: int
    ) -> web.Response:
        name = action.rsplit(".", 1)[-1]
        with self._lock:
            invoice = self._invoices.get(key)
            if invoice is None:
                raise _ODataFailure(404, "/IWBEP/CM_MGW_RT/021", f"Resource not found for {key}")
            if name != "Release":
                raise _ODataFailure(404, "/IWBEP/CM_MGW_RT/020", f"no action {action!r}")
            invoice.actions.append(name)
            invoice.version += 1
            self.writes.append(Write(key, f"POST {name}", dict(body), invoice.version))
            self._expire_csrf_if_due()
            entity = self._render(invoice, version)
        return self._json({"d": entity} if version == 2 else entity)

    # -- rendering

    @staticmethod
    def _json(
        body: Any, *, status: int = 200, headers: dict[str, str] | None = None
    ) -> web.Response:
        response = web.Response(
            status=status, text=json.dumps(body), content_type="application/json"
        )
        for name, value in (headers or {}).items():
            response.headers[name] = value
        return response

    def _error(self, failure: _ODataFailure, version: int) -> web.Response:
        message: Any = {"lang": "en", "value": failure.message} if version == 2 else failure.message
        return self._json(
            {"error": {"code": failure.code, "message": message}},
            status=failure.status,
            headers=failure.headers,
        )


# ------------------------------------------------------------------ helpers


def _render_value(name: str, value: Any, version: int) -> Any:
    if value is None:
        return None
    if name in _DATE_TIME_OFFSET and isinstance(value, date):
        moment = _as_datetime(value)
        if version == 2:
            return f"/Date({_epoch_ms(moment)}+0000)/"
        # Edm.DateTimeOffset with Precision 7 in SAP; Python keeps microseconds of it.
        return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    if name in _DATE_TIME and isinstance(value, date):
        moment = _as_datetime(value)
        return f"/Date({_epoch_ms(moment)})/" if version == 2 else moment.date().isoformat()
    if name in _DECIMAL:
        number = Decimal(str(value))
        return str(number) if version == 2 else float(number)
    return value


def _literal(text: str) -> str:
    text = text.strip()
    if text.startswith("'") and text.endswith("'"):
        return text[1:-1].replace("''", "'")
    return text


def _typed_literal(name: str, literal: str, kind: str) -> Any:
    """A function-import parameter per the OData V2 URI literal rules, as SAP Gateway parses
    it for the parameter's declared type: a mistyped literal (a quoted boolean, a number in
    quotes) is a 400, not a value."""
    patterns = {
        "Edm.String": r"'(?:[^']|'')*'",
        "Edm.Boolean": r"true|false",
        "Edm.Decimal": r"-?\d+(?:\.\d+)?[mM]?",
        "Edm.Int32": r"-?\d+",
    }
    if not re.fullmatch(patterns[kind], literal):
        raise _ODataFailure(
            400,
            "/IWBEP/CM_MGW_RT/004",
            f"Invalid parameter value {literal!r} for '{name}' of type {kind}",
        )
    if kind == "Edm.String":
        return _literal(literal)
    if kind == "Edm.Boolean":
        return literal == "true"
    if kind == "Edm.Int32":
        return int(literal)
    return Decimal(literal.rstrip("mM"))


def _parse_key(text: str) -> InvoiceKey:
    inner = text.strip().removeprefix("(").removesuffix(")")
    values = {name: _literal(value) for name, value in _PREDICATE_PART.findall(inner)}
    if "SupplierInvoice" not in values or "FiscalYear" not in values:
        raise _ODataFailure(400, "INVALID_KEY", f"invalid key predicate ({inner})")
    return values["SupplierInvoice"], values["FiscalYear"]


def _key_of(request: web.Request, rest: str, entity_set: str) -> InvoiceKey | None:
    """The invoice a modifying call names, by key predicate or function import parameters."""
    try:
        if rest.startswith(entity_set + "("):
            return _parse_key(rest[len(entity_set) :].partition(")/")[0])
        if "SupplierInvoice" in request.query and "FiscalYear" in request.query:
            return _literal(request.query["SupplierInvoice"]), _literal(request.query["FiscalYear"])
    except _ODataFailure:
        pass
    return None


def _basic_pair(header: str) -> tuple[str | None, str | None]:
    if not header.startswith("Basic "):
        return None, None
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None, None
    return user, password


def _filter_value(literal: str) -> Any:
    for prefix in ("datetimeoffset'", "datetime'"):
        if literal.startswith(prefix):
            return _as_datetime(
                datetime.fromisoformat(literal[len(prefix) : -1].replace("Z", "+00:00"))
            )
    if literal.startswith("'"):
        return _literal(literal)
    if re.match(r"^\d{4}-\d{2}-\d{2}T", literal):
        return _as_datetime(datetime.fromisoformat(literal.replace("Z", "+00:00")))
    try:
        return Decimal(literal)
    except ArithmeticError:
        raise _ODataFailure(400, "INVALID_FILTER", f"invalid literal {literal!r}") from None


def _comparable(value: Any) -> Any:
    if isinstance(value, date):
        return _as_datetime(value)
    if isinstance(value, int | float):
        return Decimal(str(value))
    return value


def _matches(properties: dict[str, Any], expression: str | None) -> bool:
    if not expression:
        return True
    for clause in re.split(r"\s+and\s+", expression):
        match = _COMPARISON.match(clause)
        if match is None:
            raise _ODataFailure(400, "INVALID_FILTER", f"unsupported $filter clause {clause!r}")
        name, operator, literal = match.groups()
        if name not in properties:
            raise _ODataFailure(400, "INVALID_FILTER", f"unknown property {name!r}")
        left, right = _comparable(properties[name]), _filter_value(literal)
        try:
            holds = {
                "eq": left == right,
                "ne": left != right,
                "gt": left > right,
                "ge": left >= right,
                "lt": left < right,
                "le": left <= right,
            }[operator]
        except TypeError:
            raise _ODataFailure(400, "INVALID_FILTER", f"cannot compare {name}") from None
        if not holds:
            return False
    return True


def _order_key(properties: dict[str, Any], orderby: str | None) -> tuple[Any, ...]:
    if not orderby:
        return (properties["SupplierInvoice"], properties["FiscalYear"])
    key: list[Any] = []
    for part in orderby.split(","):
        name, _, direction = part.strip().partition(" ")
        value = _comparable(properties.get(name))
        if direction.strip().lower() == "desc":
            if isinstance(value, datetime):
                value = -value.timestamp()
            elif isinstance(value, Decimal):
                value = -value
            else:
                raise _ODataFailure(400, "INVALID_ORDERBY", "desc only for dates and numbers")
        key.append(value)
    return tuple(key)


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _ODataFailure(400, "INVALID_JSON", str(exc)) from None
    if not isinstance(body, dict):
        raise _ODataFailure(400, "INVALID_JSON", "the body must be an object")
    return body


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ------------------------------------------------------------------ business events


def supplier_invoice_event(
    key: InvoiceKey,
    *,
    event_id: str | None = None,
    event_type: str = EVENT_TYPE_CREATED,
    source: str = EVENT_SOURCE,
) -> dict[str, Any]:
    """A structured CloudEvent as S/4HANA raises it: the keys, not the entity. ``source``
    names the system (``/default/sap.s4.beh/<SID>CLNT<client>``)."""
    return {
        "specversion": "1.0",
        "type": event_type,
        "source": source,
        "id": event_id or str(uuid.uuid4()),
        "time": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": {"SupplierInvoice": key[0], "FiscalYear": key[1]},
    }


def event_request_id(system: str, event_id: str, source: str = EVENT_SOURCE) -> uuid.UUID:
    """The request id the connector gives an event: CloudEvents identity is source + id."""
    return request_id_for(system, f"{source}#{event_id}")


def encode_event(
    event: dict[str, Any], mode: Literal["structured", "binary"]
) -> tuple[dict[str, str], bytes]:
    """Headers and body of one event in the given HTTP content mode."""
    if mode == "structured":
        return {"Content-Type": "application/cloudevents+json"}, json.dumps(event).encode()
    headers = {
        f"ce-{name}": str(value)
        for name, value in event.items()
        if name not in ("data", "datacontenttype")
    }
    headers["Content-Type"] = str(event.get("datacontenttype", "application/json"))
    return headers, json.dumps(event.get("data")).encode()


@dataclass
class PushReport:
    delivered: int = 0
    attempts: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


def push_events(
    url: str,
    events: Sequence[dict[str, Any]],
    *,
    mode: Literal["structured", "binary"] = "structured",
    concurrency: int = 4,
    timeout_s: float = 120.0,
    retry_delay_s: float = 0.2,
) -> PushReport:
    """Deliver every event, each redelivered until the receiver answers 2xx (like a
    webhook subscription of an event broker); raises ``TimeoutError`` after ``timeout_s``."""
    report = PushReport()
    lock = threading.Lock()
    deadline = time.monotonic() + timeout_s

    def deliver(client: httpx2.Client, event: dict[str, Any]) -> None:
        headers, body = encode_event(event, mode)
        while True:
            status = 0  # no answer: the receiver is down, deliver again
            with contextlib.suppress(httpx2.TransportError):
                status = client.post(url, content=body, headers=headers).status_code
            with lock:
                report.attempts += 1
                report.statuses[status] = report.statuses.get(status, 0) + 1
                if 200 <= status < 300:
                    report.delivered += 1
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"event {event['id']} not accepted within {timeout_s:.0f}s")
            time.sleep(retry_delay_s)  # the broker's redelivery interval, not a wait for state

    with httpx2.Client(timeout=30.0) as client, ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(deliver, client, event) for event in events]:
            future.result()
    return report


def invoices_from_features(
    server: SapProtocolServer,
    rows: Iterable[Iterable[float]],
    *,
    first_number: int = 5105600000,
    changed_at: datetime | None = None,
) -> list[InvoiceKey]:
    """Store one invoice per feature row (``devkit.modeling.invoices`` column order).

    Invoice i last changed ``i`` milliseconds after a minute ago, or all at ``changed_at``.
    """
    today = datetime.now(UTC).date()
    start = datetime.now(UTC) - timedelta(minutes=1)
    keys = []
    for index, row in enumerate(rows):
        amount, tenure, terms, to_due, late, new_bank, foreign, manual = (float(v) for v in row)
        keys.append(
            server.add_invoice(
                SupplierInvoice=str(first_number + index),
                InvoiceGrossAmount=Decimal(f"{amount:.2f}"),
                NetPaymentDays=int(terms),
                DueCalculationBaseDate=today + timedelta(days=round(to_due - terms)),
                YY1_VendorTenureDays=int(tenure),
                YY1_PastLatePayments=int(late),
                YY1_NewBankAccount="X" if new_bank else "",
                YY1_SupplierCountry="FR" if foreign else "DE",
                SupplierInvoiceOrigin="" if manual else "5",
                LastChangeDateTime=changed_at or start + timedelta(milliseconds=index),
            )
        )
    return keys


if __name__ == "__main__":  # pragma: no cover - a manual aid
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--invoices", type=int, default=10)
    arguments = parser.parse_args()
    from devkit.modeling.invoices import generate

    with SapProtocolServer(port=arguments.port) as running:
        invoices_from_features(running, generate(arguments.invoices, seed=1).x)
        print(f"serving {arguments.invoices} invoices on {running.base_url}{V2_SERVICE}")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
