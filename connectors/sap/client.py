"""The OData HTTP client: authentication, CSRF tokens, ETags, retries.

1. Every call authenticates with basic credentials or an OAuth client-credentials token
   (fetched from the token URL, cached until shortly before it expires, fetched again once
   on a 401).
2. A modifying call (PATCH, MERGE, POST) carries a CSRF token: fetched with
   ``x-csrf-token: Fetch`` on a GET of the service root; the session cookies that come with
   it are kept by the HTTP client and sent along. A 403 answering ``x-csrf-token: Required``
   means the token expired: fetch once more and retry once.
3. 429, 502, 503, 504 and transport errors are retried with exponential backoff and full
   jitter, never sooner than the server's ``Retry-After``.

Secrets come from the caller (the CLI reads them from environment variables) and are never
logged: log lines name method, path and status only.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx2
from pydantic import SecretStr

from connectors.sap.exceptions import (
    EntityNotFound,
    ODataError,
    PreconditionFailed,
    SapConfigError,
)
from connectors.sap.odata import (
    EntityRecord,
    EntitySource,
    Page,
    delta_params,
    entity_path,
    error_message,
    parse_entity,
    parse_page,
    resolve_link,
    retry_after_s,
)
from connectors.sap.systems import SapRetries
from connectors.sap.writeback import WritebackCall
from pipeline.resilience.retry import RetryPolicy

log = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
TOKEN_EARLY_REFRESH_S = 30.0


@dataclass(frozen=True)
class BasicCredentials:
    username: str
    password: SecretStr


@dataclass(frozen=True)
class OAuthClientCredentials:
    token_url: str
    client_id: str
    client_secret: SecretStr
    scope: str | None = None


Credentials = BasicCredentials | OAuthClientCredentials | None


def credentials_from_environment(
    kind: str,
    environment: Mapping[str, str],
    *,
    username_var: str = "SAP_USERNAME",
    password_var: str = "SAP_PASSWORD",  # noqa: S107 (a variable's name, not a secret)
    client_id_var: str = "SAP_CLIENT_ID",
    client_secret_var: str = "SAP_CLIENT_SECRET",  # noqa: S107 (a variable's name)
    token_url: str | None = None,
) -> Credentials:
    """Credentials of ``kind`` (``basic``, ``oauth``, ``none``) from environment variables."""

    def required(name: str) -> str:
        value = environment.get(name)
        if not value:
            raise SapConfigError(f"auth {kind}: environment variable {name} is not set")
        return value

    if kind == "none":
        return None
    if kind == "basic":
        return BasicCredentials(required(username_var), SecretStr(required(password_var)))
    if kind == "oauth":
        if not token_url:
            raise SapConfigError("auth oauth needs the token URL (--token-url)")
        return OAuthClientCredentials(
            token_url, required(client_id_var), SecretStr(required(client_secret_var))
        )
    raise SapConfigError(f"unknown auth kind {kind!r} (basic, oauth or none)")


class ODataClient:
    """Talks to one OData service of one SAP system."""

    def __init__(
        self,
        base_url: str,
        source: EntitySource,
        credentials: Credentials,
        *,
        retry: RetryPolicy | None = None,
        timeout_s: float = 30.0,
        max_connections: int = 16,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self._credentials = credentials
        self._retry = retry or SapRetries().odata.policy()
        self._sleep = sleep
        self._clock = clock
        self._http = httpx2.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=httpx2.Timeout(timeout_s),
            limits=httpx2.Limits(max_connections=max_connections),
            headers={"Accept": "application/json"},
        )
        self._csrf_token: str | None = None
        self._csrf_lock = asyncio.Lock()
        self._bearer: str | None = None
        self._bearer_expires = 0.0
        self._token_lock = asyncio.Lock()

    async def close(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------------ reads

    async def read_entity(self, predicate: str) -> EntityRecord:
        """One entity by its key predicate; :class:`EntityNotFound` for a 404."""
        path = entity_path(self.source, predicate)
        params = {"$format": "json"} if self.source.odata_version == 2 else None
        response = await self._send("GET", path, params=params)
        if response.status_code == 404:
            raise EntityNotFound(f"GET {path}: 404 {_describe(response)}", status=404)
        _raise_for_status("GET", path, response)
        return parse_entity(
            response.json(), self.source.odata_version, response.headers.get("etag")
        )

    async def read_changes(self, since: datetime | None) -> AsyncGenerator[Page, None]:
        """Pages of entities changed at or after ``since``, oldest first, following the
        server's next links (``__next`` / ``@odata.nextLink``, e.g. with ``$skiptoken``)."""
        url: str = self.source.collection_path
        params: dict[str, str] | None = delta_params(self.source, since)
        while True:
            response = await self._send("GET", url, params=params)
            _raise_for_status("GET", url, response)
            page = parse_page(response.json(), self.source.odata_version)
            yield page
            if page.next_link is None:
                return
            url, params = resolve_link(str(response.request.url), page.next_link), None

    # ------------------------------------------------------------------ writes

    async def write(self, call: WritebackCall, etag: str | None) -> httpx2.Response:
        """Send one writeback call; PATCH/MERGE carry ``If-Match`` (``*`` without an ETag).

        Raises :class:`PreconditionFailed` on 412 and :class:`ODataError` on other failures.
        """
        headers = {"Content-Type": "application/json"}
        method = call.method
        if method in ("PATCH", "MERGE"):
            headers["If-Match"] = etag or "*"
        if method == "MERGE":
            # SAP Gateway takes MERGE tunnelled through POST, which every proxy lets pass.
            method = "POST"
            headers["X-HTTP-Method"] = "MERGE"
        response = await self._send(
            method, call.path, json_body=call.body, headers=headers, modifying=True
        )
        if response.status_code == 412:
            raise PreconditionFailed(
                f"{call.method} {call.path}: 412 {_describe(response)}", status=412
            )
        _raise_for_status(call.method, call.path, response)
        return response

    # ------------------------------------------------------------------ plumbing

    async def _send(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, str] | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        modifying: bool = False,
    ) -> httpx2.Response:
        started = self._clock()
        attempts = 0
        csrf_retried = False
        auth_retried = False
        while True:
            attempts += 1
            request_headers = dict(headers or {})
            request_headers.update(await self._auth_headers())
            if modifying:
                request_headers["x-csrf-token"] = await self._csrf(refresh=False)
            not_before: float | None = None
            try:
                response = await self._http.request(
                    method, url, params=params, json=json_body, headers=request_headers
                )
            except httpx2.TransportError as exc:
                failure: ODataError = ODataError(f"{method} {url}: {exc!r}", transient=True)
            else:
                status = response.status_code
                if (
                    status == 403
                    and modifying
                    and response.headers.get("x-csrf-token", "").lower() == "required"
                    and not csrf_retried
                ):
                    csrf_retried = True
                    await self._csrf(refresh=True)
                    continue
                if status == 401 and isinstance(self._credentials, OAuthClientCredentials):
                    if auth_retried:
                        return response
                    auth_retried = True
                    self._bearer = None
                    continue
                if status not in TRANSIENT_STATUSES:
                    return response
                not_before = retry_after_s(response.headers.get("retry-after"))
                failure = ODataError(
                    f"{method} {url}: {status} {_describe(response)}",
                    status=status,
                    transient=True,
                )
            delay = self._retry.next_delay(
                attempts, self._clock() - started, not_before_s=not_before
            )
            if delay is None:
                raise failure
            log.info(
                'odata retry method="%s" path="%s" status="%s" attempt="%d" wait_s="%.2f"',
                method,
                url.split("?", 1)[0],
                failure.status,
                attempts,
                delay,
            )
            await self._sleep(delay)

    async def _csrf(self, *, refresh: bool) -> str:
        async with self._csrf_lock:
            if self._csrf_token is not None and not refresh:
                return self._csrf_token
            params = {"$format": "json"} if self.source.odata_version == 2 else None
            # Through _send: a busy server (429/503) is retried here too; the session cookie
            # that comes with the token is kept by the HTTP client.
            response = await self._send(
                "GET", self.source.service_root, params=params, headers={"x-csrf-token": "Fetch"}
            )
            token = response.headers.get("x-csrf-token")
            if response.status_code >= 400 or not token or token.lower() == "required":
                raise ODataError(
                    f"CSRF token fetch from {self.source.service_root}: {response.status_code}",
                    status=response.status_code,
                    transient=response.status_code in TRANSIENT_STATUSES,
                )
            self._csrf_token = token
            return token

    async def _auth_headers(self) -> dict[str, str]:
        credentials = self._credentials
        if credentials is None:
            return {}
        if isinstance(credentials, BasicCredentials):
            pair = f"{credentials.username}:{credentials.password.get_secret_value()}"
            return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode("ascii")}
        async with self._token_lock:
            if self._bearer is None or self._clock() >= self._bearer_expires:
                await self._fetch_token(credentials)
            assert self._bearer is not None
            return {"Authorization": f"Bearer {self._bearer}"}

    async def _fetch_token(self, credentials: OAuthClientCredentials) -> None:
        data = {"grant_type": "client_credentials"}
        if credentials.scope:
            data["scope"] = credentials.scope
        try:
            response = await self._http.post(
                credentials.token_url,
                data=data,
                auth=(credentials.client_id, credentials.client_secret.get_secret_value()),
            )
        except httpx2.TransportError as exc:
            raise ODataError(f"OAuth token request: {exc!r}", transient=True) from exc
        if response.status_code != 200:
            raise ODataError(
                f"OAuth token request: {response.status_code}",
                status=response.status_code,
                transient=response.status_code in TRANSIENT_STATUSES,
            )
        payload = response.json()
        self._bearer = str(payload["access_token"])
        lifetime = float(payload.get("expires_in", 3600))
        self._bearer_expires = self._clock() + max(lifetime - TOKEN_EARLY_REFRESH_S, 1.0)


def _describe(response: httpx2.Response) -> str:
    try:
        message = error_message(response.json())
    except ValueError:
        message = None
    return message or response.reason_phrase or ""


def _raise_for_status(method: str, path: str, response: httpx2.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    raise ODataError(
        f"{method} {path}: {status} {_describe(response)}",
        status=status,
        transient=status in TRANSIENT_STATUSES,
    )
