"""The SAP connector's webhook guarded, against the real broker: who may deliver (Basic,
bearer JWT, HMAC), how fast, over TLS. ``serve`` runs in this process (the SAP side is
``tests/sap_server.py``); what counts is what lands on the requests topic.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from pydantic import SecretStr

from connectors.common.mapping import load_mapping
from connectors.sap.client import BasicCredentials, ODataClient
from connectors.sap.connector import ConnectorStats, SapConnector, serve
from connectors.sap.odata import EntitySource
from connectors.sap.webhook import SECRET_VAR, WebhookLimits, WebhookSecurity, security_from_options
from connectors.sap.webhook_auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, hmac_signature
from devkit.modeling.invoices import generate
from devkit.stack.tls import ensure_authority
from pipeline.kafka.admin import end_offsets
from pipeline.settings import Settings
from pipeline.topics import ModelTopics
from schemas.models import InferenceRequest
from tests.integration.traffic import events_on_topic
from tests.sap_server import (
    SapProtocolServer,
    event_request_id,
    invoices_from_features,
    supplier_invoice_event,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MAPPING = REPO_ROOT / "connectors" / "sap" / "mappings" / "supplier_invoice.yaml"
MODEL = "invoice_risk"
SYSTEM = "S4H"
SECRET = "webhook-secret-for-the-test"
STRUCTURED = {"Content-Type": "application/cloudevents+json"}
BATCHED = {"Content-Type": "application/cloudevents-batch+json"}
T = TypeVar("T")


@pytest.fixture
def sap() -> Iterator[SapProtocolServer]:
    with SapProtocolServer() as server:
        yield server


def _requests_on_topic(settings: Settings) -> list[InferenceRequest]:
    return events_on_topic(
        settings, ModelTopics(settings.namespace, MODEL).requests, InferenceRequest
    )


def _run_webhook(
    settings: Settings,
    sap: SapProtocolServer,
    security: WebhookSecurity,
    scenario: Callable[[str], Awaitable[T]],
    *,
    scheme: str = "http",
) -> tuple[T, ConnectorStats]:
    """``serve`` on a free loopback port while ``scenario(url)`` runs; its result and the
    connector's counters once it stopped."""
    mapping = load_mapping(MAPPING)
    source = EntitySource.from_mapping(mapping.source)

    async def main() -> tuple[T, ConnectorStats]:
        credentials = BasicCredentials(sap.username, SecretStr(sap.password))
        connector = SapConnector(
            settings,
            mapping,
            ODataClient(sap.base_url, source, credentials),
            secrets=(b"webhook-test-connector-secret-0123456789",),
            name="webhook",
        )
        bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()
        serving = asyncio.create_task(
            serve(
                connector,
                host="127.0.0.1",
                port=0,
                writeback=False,
                stop=stop,
                ready=lambda port: bound.set_result(int(port or 0)),
                security=security,
            )
        )
        await asyncio.wait({bound, serving}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()  # it failed to start: raise why
        assert bound.done(), "the webhook did not start listening within 120 s"
        try:
            result = await scenario(f"{scheme}://127.0.0.1:{bound.result()}/events")
        finally:
            stop.set()
            stats = await serving
        return result, stats

    return asyncio.run(main())


def _dead_letter_count(settings: Settings) -> int:
    return sum(end_offsets(settings.kafka, ModelTopics(settings.namespace, MODEL).dlq).values())


def _basic(username: str, secret: str) -> dict[str, str]:
    pair = base64.b64encode(f"{username}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


def _events(sap: SapProtocolServer, count: int, prefix: str, seed: int) -> list[dict[str, Any]]:
    keys = invoices_from_features(sap, generate(count, seed=seed).x)
    return [supplier_invoice_event(key, event_id=f"{prefix}-{i:03d}") for i, key in enumerate(keys)]


async def _post(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], **kw: Any
) -> tuple[int, dict[str, str], Any]:
    async with session.post(url, data=body, headers=headers, **kw) as answer:
        return answer.status, dict(answer.headers), await answer.json(content_type=None)


def test_only_authenticated_deliveries_are_published(
    settings: Settings, sap: SapProtocolServer
) -> None:
    events = _events(sap, 6, "auth", seed=23)
    security = security_from_options(
        auth="basic",
        environment={SECRET_VAR: SECRET},
        username="event-mesh",
        limits=WebhookLimits(max_events_per_delivery=2),
    )
    first = json.dumps(events[0]).encode()
    right = {**STRUCTURED, **_basic("event-mesh", SECRET)}
    wrong = {**STRUCTURED, **_basic("event-mesh", "not-the-secret")}

    async def scenario(url: str) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with aiohttp.ClientSession() as session:
            seen["anonymous"] = await _post(session, url, first, STRUCTURED)
            seen["wrong"] = await _post(session, url, first, wrong)
            seen["malformed"] = await _post(
                session, url, first, {**STRUCTURED, "Authorization": "Basic %%%"}
            )
            # An invalid event is dead-lettered only when its sender is authenticated.
            seen["invalid"] = await _post(session, url, b'{"specversion": "1.0"}', STRUCTURED)
            seen["before"] = await asyncio.to_thread(_requests_on_topic, settings)
            seen["dlq_before"] = await asyncio.to_thread(_dead_letter_count, settings)
            seen["accepted"] = await _post(session, url, first, right)
            batch = json.dumps(events[1:3]).encode()
            seen["batch"] = await _post(session, url, batch, {**right, **BATCHED})
            too_many = json.dumps(events[3:6]).encode()
            seen["too_many"] = await _post(session, url, too_many, {**right, **BATCHED})
        return seen

    seen, stats = _run_webhook(settings, sap, security, scenario)
    for refused in ("anonymous", "wrong", "malformed", "invalid"):
        status, headers, body = seen[refused]
        assert status == 401, refused
        assert headers["WWW-Authenticate"].startswith('Basic realm="sluiceway"')
        assert body == {"error": "unauthorized"}
        assert SECRET not in json.dumps(body)
    assert seen["before"] == [], "a refused delivery published nothing"
    assert seen["dlq_before"] == 0, "nor dead-lettered anything"
    assert seen["accepted"][0] == 200
    assert seen["batch"][0] == 200
    status, _headers, body = seen["too_many"]
    assert status == 413
    assert body["error"] == "too_many_events"
    assert "at most 2 events" in body["reason"]
    requests = _requests_on_topic(settings)
    assert sorted(str(r.request_id) for r in requests) == sorted(
        str(event_request_id(SYSTEM, event["id"])) for event in events[:3]
    )
    assert (stats.auth_failures, stats.too_many_events, stats.published) == (4, 1, 3)


def test_a_flood_beyond_the_rate_limit_is_refused_and_what_was_accepted_is_published(
    settings: Settings, sap: SapProtocolServer
) -> None:
    deliveries = 20
    events = _events(sap, 2 * deliveries, "flood", seed=29)
    batches = [events[i : i + 2] for i in range(0, len(events), 2)]
    # A burst of 3 and then one delivery per 100 s: the flood outruns it at any machine speed.
    security = WebhookSecurity(
        limits=WebhookLimits(
            per_client_rate=0.01, per_client_burst=3, total_rate=1000, total_burst=1000
        )
    )

    async def scenario(url: str) -> list[tuple[int, dict[str, str], Any]]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(
                *(_post(session, url, json.dumps(batch).encode(), BATCHED) for batch in batches)
            )

    answers, stats = _run_webhook(settings, sap, security, scenario)
    accepted = [
        batch for batch, (status, _, _) in zip(batches, answers, strict=True) if status == 200
    ]
    limited = [headers for status, headers, _ in answers if status == 429]
    assert len(accepted) == 3
    assert len(limited) == deliveries - 3, [status for status, _, _ in answers]
    assert all(int(headers["Retry-After"]) >= 1 for headers in limited)
    requests = _requests_on_topic(settings)
    assert len(requests) == 2 * len(accepted), "every event of an accepted delivery, no other"
    assert {str(r.request_id) for r in requests} == {
        str(event_request_id(SYSTEM, event["id"])) for batch in accepted for event in batch
    }
    assert stats.rate_limited == deliveries - 3


def test_tls_and_hmac_signatures(
    settings: Settings, sap: SapProtocolServer, tmp_path: Path
) -> None:
    authority = ensure_authority(tmp_path)
    certificate = authority.issue_server(tmp_path, "webhook")
    security = security_from_options(
        auth="hmac",
        environment={SECRET_VAR: SECRET},
        tls_cert=certificate.certificate,
        tls_key=certificate.key,
    )
    (event,) = _events(sap, 1, "tls", seed=31)
    body = json.dumps(event).encode()
    trusting = ssl.create_default_context(cafile=str(authority.certificate))

    def signed(payload: bytes) -> dict[str, str]:
        stamp = str(int(time.time()))
        return {
            **STRUCTURED,
            TIMESTAMP_HEADER: stamp,
            SIGNATURE_HEADER: hmac_signature(SECRET.encode(), stamp, payload),
        }

    async def scenario(url: str) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with aiohttp.ClientSession() as session:
            # A client that does not trust the test CA refuses the server's certificate.
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await _post(session, url, body, signed(body))
            # Plain HTTP to the TLS port gets no answer.
            with pytest.raises(aiohttp.ClientError):
                await _post(session, url.replace("https://", "http://"), body, signed(body))
            tampered = body.replace(b"tls-000", b"tls-999")
            seen["tampered"] = await _post(session, url, tampered, {**signed(body)}, ssl=trusting)
            seen["unsigned"] = await _post(session, url, body, STRUCTURED, ssl=trusting)
            seen["signed"] = await _post(session, url, body, signed(body), ssl=trusting)
        return seen

    seen, stats = _run_webhook(settings, sap, security, scenario, scheme="https")
    for refused in ("tampered", "unsigned"):
        status, headers, _ = seen[refused]
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("HMAC-SHA256")
    assert seen["signed"][0] == 200
    (request,) = _requests_on_topic(settings)
    assert request.request_id == event_request_id(SYSTEM, "tls-000")
    assert stats.auth_failures == 2


def test_bearer_tokens_checked_against_a_key_set_file(
    settings: Settings, sap: SapProtocolServer, tmp_path: Path
) -> None:
    signing_key = ec.generate_private_key(ec.SECP256R1())
    jwks = tmp_path / "jwks.json"
    public_jwk = ECAlgorithm.to_jwk(signing_key.public_key(), as_dict=True)
    jwks.write_text(json.dumps({"keys": [{**public_jwk, "kid": "mesh-1", "use": "sig"}]}))
    security = security_from_options(
        auth="jwt",
        environment={},
        jwt_issuer="https://idp.example.com/",
        jwt_audience="sluiceway-webhook",
        jwks=str(jwks),
    )
    (event,) = _events(sap, 1, "jwt", seed=37)
    body = json.dumps(event).encode()

    def bearer(lifetime_s: int, **header: Any) -> dict[str, str]:
        claims = {
            "iss": "https://idp.example.com/",
            "aud": "sluiceway-webhook",
            "sub": "event-mesh",
            "exp": int(time.time()) + lifetime_s,
        }
        token = jwt.encode(claims, signing_key, "ES256", headers={"kid": "mesh-1", **header})
        return {**STRUCTURED, "Authorization": f"Bearer {token}"}

    async def scenario(url: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            return {
                "expired": await _post(session, url, body, bearer(-120)),
                "unknown_kid": await _post(session, url, body, bearer(300, kid="mesh-9")),
                "valid": await _post(session, url, body, bearer(300)),
            }

    seen, stats = _run_webhook(settings, sap, security, scenario)
    for refused in ("expired", "unknown_kid"):
        status, headers, _ = seen[refused]
        assert status == 401
        assert headers["WWW-Authenticate"] == 'Bearer realm="sluiceway", error="invalid_token"'
    assert seen["valid"][0] == 200
    (request,) = _requests_on_topic(settings)
    assert request.request_id == event_request_id(SYSTEM, "jwt-000")
    assert stats.auth_failures == 2
