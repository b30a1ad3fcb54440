"""OAUTHBEARER tokens for Kafka clients: from an OIDC token endpoint, or from a file.

librdkafka fetches OIDC tokens itself (``sasl.oauthbearer.method=oidc``); aiokafka (the faust
monitor) asks a token provider, so :class:`OidcTokenProvider` does the same client credentials
grant. A token file has no librdkafka setting at all: :func:`file_token_callback` is the
``oauth_cb`` that reads it, and :class:`FileTokenProvider` its aiokafka twin.

The client never verifies a token (the broker does); it only reads ``exp`` and ``sub`` to know
when to refresh and which principal it claims. Everything that parses is pure and treats its
input as hostile: a token endpoint or a token file is outside this process.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from aiokafka.abc import AbstractTokenProvider
from aiokafka.errors import KafkaConnectionError

MAX_TOKEN_BYTES = 64 * 1024
"""Larger than any real JWT; a bigger file or answer is refused rather than read."""
MAX_TOKEN_LIFETIME_S = 24 * 3600.0
"""A token endpoint claiming a longer life is believed only this far."""
REFRESH_AT = 0.8
"""Refresh once this fraction of a token's life has passed (librdkafka does the same)."""
TOKEN_REQUEST_TIMEOUT_S = 10.0


class TokenError(Exception):
    """No usable token: the message says why, never the token or the secret."""


class TokenUnavailableError(TokenError, KafkaConnectionError):  # type: ignore[misc]
    """What the aiokafka providers raise: aiokafka treats it as a failed connection (logged,
    the next broker tried, retried later) instead of an unexpected crash of its client."""


@dataclass(frozen=True)
class Token:
    value: str
    expires_at: float
    """Epoch seconds."""
    principal: str


def jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a compact JWS (``header.payload.signature``), unverified (pure)."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise TokenError("not a JWT (three dot-separated base64url parts)")
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise TokenError("the JWT payload is not base64url JSON") from exc
    if not isinstance(claims, dict):
        raise TokenError("the JWT payload is not a JSON object")
    return claims


def token_from_jwt(value: str, *, now: float, lifetime_s: float | None = None) -> Token:
    """A :class:`Token` with its expiry from ``exp`` (or ``now + lifetime_s``) and its
    principal from ``sub`` (pure)."""
    if not value or len(value) > MAX_TOKEN_BYTES or not value.isascii() or not value.isprintable():
        raise TokenError("the token is empty, too long or not printable ASCII")
    claims = jwt_claims(value)
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise TokenError("the JWT has no 'sub' claim (the principal)")
    expiry = claims.get("exp")
    if isinstance(expiry, bool) or not isinstance(expiry, int | float):
        if lifetime_s is None:
            raise TokenError("the JWT has no numeric 'exp' claim")
        expiry = now + lifetime_s
    expires_at = min(float(expiry), now + MAX_TOKEN_LIFETIME_S)
    if expires_at <= now:
        raise TokenError("the token has expired")
    return Token(value, expires_at, subject)


def read_token_file(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace removed), at most :data:`MAX_TOKEN_BYTES`."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise TokenError(f"token file {str(path)!r} cannot be read ({exc.strerror})") from exc
    if len(data) > MAX_TOKEN_BYTES:
        raise TokenError(f"token file {str(path)!r} is larger than {MAX_TOKEN_BYTES} bytes")
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise TokenError(f"token file {str(path)!r} is not ASCII") from exc


def file_token_callback(path: Path) -> Callable[[str], tuple[str, float, str]]:
    """librdkafka's ``oauth_cb``: the token in ``path``, its expiry and its principal.

    librdkafka calls it again shortly before the expiry, so a rotated file is picked up.
    """

    def refresh(_oauthbearer_config: str) -> tuple[str, float, str]:
        token = token_from_jwt(read_token_file(path), now=time.time())
        return token.value, token.expires_at, token.principal

    return refresh


def token_request(
    client_id: str, client_secret: str, scope: str | None
) -> tuple[dict[str, str], str]:
    """Headers and form body of a client credentials grant (RFC 6749 section 4.4, pure).

    The credentials go in HTTP Basic, each form-encoded first (section 2.3.1), so a ``:`` in
    the client id cannot shift where the secret starts.
    """
    pair = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}"
    headers = {
        "Authorization": "Basic " + base64.b64encode(pair.encode()).decode("ascii"),
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json",
    }
    form = {"grant_type": "client_credentials"}
    if scope:
        form["scope"] = scope
    return headers, urlencode(form)


def parse_token_response(status: int, body: bytes, *, now: float) -> Token:
    """The token in a token endpoint's answer (pure); the answer is not trusted."""
    if status != 200:
        raise TokenError(f"the token endpoint answered HTTP {status}")
    if len(body) > MAX_TOKEN_BYTES:
        raise TokenError("the token endpoint's answer is too large")
    try:
        answer = json.loads(body)
    except ValueError as exc:
        raise TokenError("the token endpoint's answer is not JSON") from exc
    if not isinstance(answer, dict):
        raise TokenError("the token endpoint's answer is not a JSON object")
    value = answer.get("access_token")
    if not isinstance(value, str):
        raise TokenError("the token endpoint's answer has no access_token")
    token_type = answer.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenError("the token endpoint's answer is not a bearer token")
    lifetime = answer.get("expires_in")
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
        lifetime = None
    return token_from_jwt(value, now=now, lifetime_s=lifetime)


def needs_refresh(token: Token | None, fetched_at: float, now: float) -> bool:
    """Whether a cached token should be replaced before use (pure)."""
    if token is None:
        return True
    return now >= fetched_at + (token.expires_at - fetched_at) * REFRESH_AT


class OidcTokenProvider(AbstractTokenProvider):  # type: ignore[misc]  # aiokafka is untyped
    """aiokafka's OAUTHBEARER tokens from an OIDC token endpoint (client credentials grant).

    One token is shared by every connection of the client and fetched again after
    :data:`REFRESH_AT` of its life; concurrent callers wait for the same fetch.
    """

    def __init__(
        self,
        endpoint: str,
        client_id: str,
        client_secret: str,
        scope: str | None,
        ssl_context: ssl.SSLContext | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._endpoint = endpoint
        self._request = token_request(client_id, client_secret, scope)
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._clock = clock
        self._token: Token | None = None
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        async with self._lock:
            if needs_refresh(self._token, self._fetched_at, self._clock()):
                self._fetched_at = self._clock()
                try:
                    self._token = await self._fetch()
                except TokenError as exc:
                    raise TokenUnavailableError(str(exc)) from exc
            assert self._token is not None
            return self._token.value

    async def _fetch(self) -> Token:
        headers, body = self._request
        timeout = aiohttp.ClientTimeout(total=TOKEN_REQUEST_TIMEOUT_S)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(
                    self._endpoint, data=body, headers=headers, ssl=self._ssl, allow_redirects=False
                ) as response,
            ):
                answer = await response.content.read(MAX_TOKEN_BYTES + 1)
                return parse_token_response(response.status, answer, now=self._clock())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TokenError(f"token endpoint unreachable: {type(exc).__name__}") from exc


class FileTokenProvider(AbstractTokenProvider):  # type: ignore[misc]  # aiokafka is untyped
    """aiokafka's OAUTHBEARER token read from a file at every (re)authentication."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock

    async def token(self) -> str:
        try:
            value = await asyncio.to_thread(read_token_file, self._path)
            return token_from_jwt(value, now=self._clock()).value
        except TokenError as exc:
            raise TokenUnavailableError(str(exc)) from exc
