"""OAUTHBEARER tokens: what a token endpoint or a token file hands over is not trusted."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import pytest
from aiohttp import web
from aiokafka.errors import KafkaConnectionError

from pipeline.kafka.oauth import (
    MAX_TOKEN_BYTES,
    MAX_TOKEN_LIFETIME_S,
    FileTokenProvider,
    OidcTokenProvider,
    Token,
    TokenError,
    file_token_callback,
    jwt_claims,
    needs_refresh,
    parse_token_response,
    read_token_file,
    token_from_jwt,
    token_request,
)

NOW = 1_800_000_000.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _jwt(claims: Any) -> str:
    return f"{_b64(b'{}')}.{_b64(json.dumps(claims).encode())}.c2ln"


# ---------------------------------------------------------------- JWTs


def test_a_jwt_gives_its_expiry_and_principal() -> None:
    token = token_from_jwt(_jwt({"sub": "monitor", "exp": NOW + 300}), now=NOW)
    assert (token.expires_at, token.principal) == (NOW + 300, "monitor")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("a.b", "not a JWT"),
        ("a.b.c.d", "not a JWT"),
        (".e30.", "not a JWT"),
        ("e30.!!!.c2ln", "not base64url JSON"),
        (f"e30.{_b64(b'not json')}.c2ln", "not base64url JSON"),
        (f"e30.{_b64(b'[1, 2]')}.c2ln", "not a JSON object"),
        (_jwt({"exp": NOW + 60}), "no 'sub'"),
        (_jwt({"sub": "", "exp": NOW + 60}), "no 'sub'"),
        (_jwt({"sub": ["admin"], "exp": NOW + 60}), "no 'sub'"),
        (_jwt({"sub": "monitor"}), "no numeric 'exp'"),
        (_jwt({"sub": "monitor", "exp": "tomorrow"}), "no numeric 'exp'"),
        (_jwt({"sub": "monitor", "exp": True}), "no numeric 'exp'"),
        (_jwt({"sub": "monitor", "exp": NOW - 1}), "expired"),
        (_jwt({"sub": "monitor", "exp": NOW + 60}) + "\n", "printable"),
        ("é" + _jwt({"sub": "monitor", "exp": NOW + 60}), "printable ASCII"),
        ("a" * (MAX_TOKEN_BYTES + 1), "too long"),
    ],
)
def test_a_broken_or_hostile_jwt_is_refused(value: str, reason: str) -> None:
    with pytest.raises(TokenError, match=reason):
        token_from_jwt(value, now=NOW)


def test_an_absurd_expiry_is_believed_only_for_a_day() -> None:
    token = token_from_jwt(_jwt({"sub": "m", "exp": 1e300}), now=NOW)
    assert token.expires_at == NOW + MAX_TOKEN_LIFETIME_S


def test_unpadded_and_padded_payloads_decode_alike() -> None:
    payload = base64.urlsafe_b64encode(b'{"sub":"m"}').decode()
    assert jwt_claims(f"e30.{payload}.x") == jwt_claims(f"e30.{payload.rstrip('=')}.x")


# ---------------------------------------------------------------- token files


def test_a_token_file_is_read_and_trimmed(tmp_path: Path) -> None:
    path = tmp_path / "token"
    value = _jwt({"sub": "worker-a", "exp": time.time() + 60})
    path.write_text(f"  {value}\n")
    assert read_token_file(path) == value
    token, expires_at, principal = file_token_callback(path)("ignored config")
    assert (token, principal) == (value, "worker-a")
    assert expires_at > time.time()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"x" * (MAX_TOKEN_BYTES + 1), "larger than"),
        (b"\xff\xfe binary", "not ASCII"),
        (b"", "empty"),
    ],
)
def test_a_hostile_token_file_is_refused(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(TokenError, match=reason):
        file_token_callback(path)("")


def test_a_missing_token_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="cannot be read"):
        read_token_file(tmp_path / "gone")


def test_the_aiokafka_file_provider_reads_the_file_each_time(tmp_path: Path) -> None:
    path = tmp_path / "token"
    first = _jwt({"sub": "monitor", "exp": time.time() + 60})
    second = _jwt({"sub": "monitor", "exp": time.time() + 120})
    provider = FileTokenProvider(path)

    async def both() -> tuple[str, str]:
        path.write_text(first)
        one = await provider.token()
        path.write_text(second)
        return one, await provider.token()

    assert asyncio.run(both()) == (first, second)


# ---------------------------------------------------------------- the token endpoint


def test_the_grant_form_encodes_credentials_so_a_colon_cannot_shift_the_secret() -> None:
    headers, body = token_request("id:with:colons", "s3cr&t=x", "kafka write")
    scheme, encoded = headers["Authorization"].split(" ")
    client_id, secret = base64.b64decode(encoded).decode().split(":")
    assert scheme == "Basic"
    assert (unquote(client_id), unquote(secret)) == ("id:with:colons", "s3cr&t=x")
    assert parse_qs(body) == {"grant_type": ["client_credentials"], "scope": ["kafka write"]}
    assert "scope" not in parse_qs(token_request("c", "s", None)[1])


def test_an_answer_gives_the_token_and_honours_expires_in_when_exp_is_missing() -> None:
    access = _jwt({"sub": "monitor"})
    body = json.dumps({"access_token": access, "token_type": "Bearer", "expires_in": 300})
    assert parse_token_response(200, body.encode(), now=NOW) == Token(access, NOW + 300, "monitor")


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (401, b'{"error": "invalid_client"}', "HTTP 401"),
        (302, b"", "HTTP 302"),
        (200, b"<html>", "not JSON"),
        (200, b'["a"]', "not a JSON object"),
        (200, b"{}", "no access_token"),
        (200, b'{"access_token": 7}', "no access_token"),
        (
            200,
            json.dumps({"access_token": _jwt({"sub": "m"}), "token_type": "mac"}).encode(),
            "bearer",
        ),
        (200, json.dumps({"access_token": _jwt({"sub": "m"}), "expires_in": -5}).encode(), "exp"),
        (200, json.dumps({"access_token": _jwt({"sub": "m"}), "expires_in": "60"}).encode(), "exp"),
        (200, b" " * (MAX_TOKEN_BYTES + 1), "too large"),
    ],
)
def test_a_bad_answer_from_the_token_endpoint_is_refused(
    status: int, body: bytes, reason: str
) -> None:
    with pytest.raises(TokenError, match=reason):
        parse_token_response(status, body, now=NOW)


def test_a_token_is_refreshed_after_most_of_its_life() -> None:
    token = Token("t", NOW + 100, "m")
    assert needs_refresh(None, NOW, NOW)
    assert not needs_refresh(token, NOW, NOW + 79)
    assert needs_refresh(token, NOW, NOW + 80)


class _Endpoint:
    """A real OIDC token endpoint on loopback that counts its grants."""

    def __init__(self, answer: Callable[[web.Request], web.Response]) -> None:
        self.answer = answer
        self.requests: list[tuple[str, dict[str, list[str]]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        form = parse_qs(await request.text())
        self.requests.append((request.headers.get("Authorization", ""), form))
        return self.answer(request)


async def _serving(endpoint: _Endpoint) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/token", endpoint.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/token"
    finally:
        await runner.cleanup()


def test_the_provider_fetches_once_shares_the_token_and_refreshes_it() -> None:
    clock = [NOW]

    def grant(_request: web.Request) -> web.Response:
        access = _jwt({"sub": "monitor", "exp": clock[0] + 100, "n": len(endpoint.requests)})
        return web.json_response({"access_token": access, "token_type": "Bearer"})

    endpoint = _Endpoint(grant)

    async def scenario() -> list[str]:
        async for url in _serving(endpoint):
            provider = OidcTokenProvider(url, "monitor", "secret", "kafka", None, lambda: clock[0])
            together = await asyncio.gather(*(provider.token() for _ in range(5)))
            clock[0] += 50
            still = await provider.token()
            clock[0] += 40
            refreshed = await provider.token()
            return [*together, still, refreshed]
        raise AssertionError("the endpoint did not start")

    tokens = asyncio.run(scenario())
    assert len(set(tokens[:6])) == 1
    assert tokens[6] != tokens[0]
    assert len(endpoint.requests) == 2
    authorization, form = endpoint.requests[0]
    assert base64.b64decode(authorization.removeprefix("Basic ")) == b"monitor:secret"
    assert form == {"grant_type": ["client_credentials"], "scope": ["kafka"]}


def test_a_refusing_endpoint_is_a_token_error_without_the_secret() -> None:
    endpoint = _Endpoint(
        lambda _request: web.json_response({"error": "invalid_client"}, status=401)
    )

    async def scenario() -> None:
        async for url in _serving(endpoint):
            await OidcTokenProvider(url, "monitor", "the-secret", None, None).token()

    with pytest.raises(TokenError, match="HTTP 401") as caught:
        asyncio.run(scenario())
    assert "the-secret" not in str(caught.value)
    # aiokafka treats it as a failed connection (logged, retried), not as a crash.
    assert isinstance(caught.value, KafkaConnectionError)


def test_the_file_provider_fails_like_a_connection_when_the_file_is_gone(tmp_path: Path) -> None:
    with pytest.raises(KafkaConnectionError, match="cannot be read"):
        asyncio.run(FileTokenProvider(tmp_path / "gone").token())


def test_an_unreachable_endpoint_is_a_token_error() -> None:
    async def scenario() -> None:
        await OidcTokenProvider("http://127.0.0.1:9/token", "m", "s", None, None).token()

    with pytest.raises(TokenError, match="unreachable"):
        asyncio.run(scenario())


def test_a_redirect_is_not_followed_with_the_credentials() -> None:
    def redirect(_request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": "http://203.0.113.9/steal"})

    endpoint = _Endpoint(redirect)

    async def scenario() -> None:
        async for url in _serving(endpoint):
            await OidcTokenProvider(url, "m", "s", None, None).token()

    with pytest.raises(TokenError, match="HTTP 307"):
        asyncio.run(scenario())
