"""One SAP connector over two S/4HANA systems, against the real broker.

Each system is its own protocol server (``tests/sap_server.py``) with its own login, and the
two reuse invoice numbers and event ids, as independent systems do. The connector routes each
event by its CloudEvents ``source`` and ``type``, reads the entity from the system it came
from, turns cancellations into invalidations (and voids a create that arrives after its
cancellation), deduplicates by ``source`` + ``id`` across a restart, answers the webhook
handshake, and writes typed, conditional action parameters back. Every input event ends in
exactly one outcome of the connector's table.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import httpx2
import numpy as np
import pytest
import yaml
from pydantic import BaseModel, SecretStr

import schemas
from connectors.common.correlation import ENV_VARIABLE
from connectors.common.mapping import parse_mapping
from connectors.common.outcomes import OUTCOMES
from connectors.sap.client import BasicCredentials, ODataClient
from connectors.sap.connector import ConnectorStats, SapConnector, build_route, serve
from connectors.sap.core import malformed_letter_key
from connectors.sap.history import dead_lettered_events
from connectors.sap.odata import EntitySource
from connectors.sap.webhook import SECRET_VAR, WebhookSecurity, security_from_options
from devkit.modeling.invoices import generate
from pipeline.settings import Settings
from pipeline.topics import ModelTopics
from schemas.models import (
    DeadLetter,
    InferenceRequest,
    InferenceResult,
    Invalidation,
    InvalidationKind,
    Outputs,
    ResultStatus,
    Tensor,
    TensorDatatype,
)
from tests.integration.traffic import events_on_topic, publish
from tests.integration.waiting import wait_for
from tests.sap_server import (
    EVENT_TYPE_CANCELED,
    EVENT_TYPE_CHANGED,
    EVENT_TYPE_CREATED,
    InvoiceKey,
    SapProtocolServer,
    encode_event,
    event_request_id,
    free_port,
    invoices_from_features,
    push_events,
    supplier_invoice_event,
)
from workers.processes import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
MAPPING = REPO_ROOT / "connectors" / "sap" / "mappings" / "supplier_invoice.yaml"
MODEL = "invoice_risk"
S4H_SOURCE = "/default/sap.s4.beh/S4HCLNT100"
S4P_SOURCE = "/default/sap.s4.beh/S4PCLNT200"
CONNECTOR = "sap-two-systems"
SECRET = b"sap-two-systems-test-secret-0123456789ab"
UNMAPPED_TYPE = "sap.s4.beh.purchaseorder.v1.PurchaseOrder.Created.v1"
MALFORMED = b'{"specversion": "1.0", "type": "x"}'
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
"""Since when a DLQ is read back for its source-event headers: from its start."""
T = TypeVar("T")
E = TypeVar("E", bound=BaseModel)


@pytest.fixture
def systems() -> Iterator[tuple[SapProtocolServer, SapProtocolServer]]:
    # Different logins: an event of one system read from the other would fail with 401.
    with (
        SapProtocolServer(username="s4h-user", password="s4h-password") as s4h,
        SapProtocolServer(username="s4p-user", password="s4p-password") as s4p,
    ):
        yield s4h, s4p


def _routes(
    settings: Settings,
    s4h: SapProtocolServer,
    s4p: SapProtocolServer,
    writeback: dict[str, Any] | None = None,
) -> list[Any]:
    routes = []
    for system, server, source in (("S4H", s4h, S4H_SOURCE), ("S4P", s4p, S4P_SOURCE)):
        data = yaml.safe_load(MAPPING.read_text())
        data["source_system"] = system
        data["source"]["event_types"] = [
            EVENT_TYPE_CREATED,
            EVENT_TYPE_CHANGED,
            EVENT_TYPE_CANCELED,
        ]
        if writeback is not None:
            data["writeback"] = writeback
        mapping = parse_mapping(data, origin=f"{system} mapping")
        entities = EntitySource.from_mapping(mapping.source)
        credentials = BasicCredentials(server.username, SecretStr(server.password))
        routes.append(
            build_route(
                settings.namespace,
                mapping,
                ODataClient(server.base_url, entities, credentials),
                name=f"{system}/{entities.entity_set}",
                system=system,
                event_sources=(source,),
            )
        )
    return routes


def _run(
    settings: Settings,
    routes: list[Any],
    scenario: Callable[[str, SapConnector], Awaitable[T]],
    *,
    writeback: bool = False,
    security: WebhookSecurity | None = None,
) -> tuple[T, ConnectorStats]:
    """``serve`` the connector on a free loopback port while ``scenario(url, connector)``
    runs; its result and the counters once the connector stopped."""

    async def main() -> tuple[T, ConnectorStats]:
        connector = SapConnector(settings, routes=routes, secrets=(SECRET,), name=CONNECTOR)
        bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()
        serving = asyncio.create_task(
            serve(
                connector,
                host="127.0.0.1",
                port=0,
                writeback=writeback,
                stop=stop,
                ready=lambda port: bound.set_result(int(port or 0)),
                security=security,
            )
        )
        await asyncio.wait({bound, serving}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()
        assert bound.done(), "the connector did not start listening within 120 s"
        try:
            result = await scenario(f"http://127.0.0.1:{bound.result()}/events", connector)
        finally:
            stop.set()
            stats = await serving
        return result, stats

    return asyncio.run(main())


async def _until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)  # the next look at the condition, not a wait for state


def _event(key: InvoiceKey, event_id: str, source: str, kind: str = EVENT_TYPE_CREATED) -> Any:
    return supplier_invoice_event(key, event_id=event_id, event_type=kind, source=source)


async def _deliver(
    session: aiohttp.ClientSession, url: str, event: dict[str, Any], mode: str = "structured"
) -> int:
    if mode == "json":  # structured, as Event Mesh sends it: plain application/json
        headers, body = {"Content-Type": "application/json"}, json.dumps(event).encode()
    else:
        headers, body = encode_event(event, "binary" if mode == "binary" else "structured")
    async with session.post(url, data=body, headers=headers) as answer:
        return answer.status


def _entity_reads(server: SapProtocolServer) -> int:
    return sum(1 for call in server.calls if call.method == "GET" and call.key is not None)


def test_one_connector_serves_two_systems_and_accounts_for_every_event(
    settings: Settings, systems: tuple[SapProtocolServer, SapProtocolServer]
) -> None:
    s4h, s4p = systems
    h = invoices_from_features(s4h, generate(5, seed=41).x)
    # The same invoice numbers in the other system: only the event source tells them apart.
    p = invoices_from_features(s4p, generate(4, seed=43).x)
    assert h[:4] == p
    h_s, p_s = S4H_SOURCE, S4P_SOURCE
    deliveries: list[tuple[dict[str, Any] | bytes, str]] = [
        (_event(h[0], "e-1", h_s), "structured"),  # request
        (_event(p[0], "e-1", p_s), "structured"),  # request: same id, other source
        (_event(h[0], "e-1", h_s), "structured"),  # duplicate
        (_event(h[1], "e-2", h_s), "structured"),  # request
        (_event(h[1], "e-3", h_s, EVENT_TYPE_CHANGED), "binary"),  # request
        (_event(h[2], "c-1", h_s, EVENT_TYPE_CANCELED), "structured"),  # invalidation
        (_event(h[2], "e-4", h_s), "structured"),  # skipped: cancelled before its creation
        (_event(h[3], "e-5", h_s), "structured"),  # request
        (_event(h[3], "c-2", h_s, EVENT_TYPE_CANCELED), "structured"),  # invalidation
        (_event(p[1], "c-1", p_s, EVENT_TYPE_CANCELED), "json"),  # invalidation
        (_event(p[1], "c-1", p_s, EVENT_TYPE_CANCELED), "structured"),  # duplicate
        (_event(h[0], "u-1", h_s, UNMAPPED_TYPE), "structured"),  # skipped: unmapped type
        (_event(h[0], "u-2", "/default/sap.s4.beh/XXXCLNT999"), "structured"),  # skipped
        (MALFORMED, "raw"),  # dead letter
        (MALFORMED, "raw"),  # duplicate: the same malformed body once more
        (_event(("404", "2024"), "e-6", p_s), "structured"),  # dead letter: no such entity
        (_event(p[2], "e-7", p_s), "json"),  # request: structured as application/json
        (_event(p[3], "e-8", p_s), "binary"),  # request
    ]

    async def scenario(url: str, _connector: SapConnector) -> dict[str, Any]:
        seen: dict[str, Any] = {"statuses": []}
        async with aiohttp.ClientSession() as session:
            origin = {"WebHook-Request-Origin": "eventmesh.example.com"}
            async with session.options(url, headers=origin) as answer:
                seen["handshake"] = (answer.status, dict(answer.headers))
            async with session.options(url) as answer:
                seen["no_origin"] = answer.status
            for delivery, mode in deliveries:
                if isinstance(delivery, bytes):
                    headers = {"Content-Type": "application/cloudevents+json"}
                    async with session.post(url, data=delivery, headers=headers) as answer:
                        seen["statuses"].append(answer.status)
                else:
                    seen["statuses"].append(await _deliver(session, url, delivery, mode))
            async with session.get(url.replace("/events", "/healthz")) as answer:
                seen["health"] = await answer.json()
        return seen

    seen, stats = _run(settings, _routes(settings, s4h, s4p), scenario)

    status, headers = seen["handshake"]
    assert status == 200
    assert headers["WebHook-Allowed-Origin"] == "eventmesh.example.com"
    assert int(headers["WebHook-Allowed-Rate"]) >= 1
    assert seen["no_origin"] == 400
    assert seen["statuses"] == [200] * len(deliveries), "every event acknowledged"

    expected = {"request": 7, "invalidation": 3, "duplicate": 3, "skipped": 3, "dead_letter": 2}
    assert stats.outcomes == expected
    assert sum(stats.outcomes.values()) == len(deliveries) == stats.events
    assert seen["health"]["outcomes"] == expected
    assert sum(seen["health"]["outcomes"].values()) == len(deliveries)
    assert stats.outcomes_by_route == {
        "S4H/A_SupplierInvoice": {
            "request": 4,
            "invalidation": 2,
            "duplicate": 1,
            "skipped": 1,
            "dead_letter": 0,
        },
        "S4P/A_SupplierInvoice": {
            "request": 3,
            "invalidation": 1,
            "duplicate": 1,
            "skipped": 0,
            "dead_letter": 1,
        },
        "(unmapped)": dict.fromkeys(OUTCOMES, 0) | {"skipped": 2},
        "(malformed)": dict.fromkeys(OUTCOMES, 0) | {"dead_letter": 1, "duplicate": 1},
    }
    assert dict(stats.skipped_events) == {"cancelled": 1, "unmapped_type": 2}
    table = stats.outcome_table().splitlines()
    assert table[-1].split() == ["total", "7", "3", "3", "3", "2", "18"]

    topics = ModelTopics(settings.namespace, MODEL)
    requests = events_on_topic(settings, topics.requests, InferenceRequest)
    assert sorted(str(r.request_id) for r in requests) == sorted(
        str(event_request_id(system, event_id, source))
        for system, event_id, source in [
            ("S4H", "e-1", h_s),
            ("S4H", "e-2", h_s),
            ("S4H", "e-3", h_s),
            ("S4H", "e-5", h_s),
            ("S4P", "e-1", p_s),
            ("S4P", "e-7", p_s),
            ("S4P", "e-8", p_s),
        ]
    )
    invalidations = events_on_topic(settings, topics.invalidations, Invalidation)
    assert sorted((i.source_system, i.entity_key) for i in invalidations) == [
        ("S4H", f"1010/{h[2][0]}/2024"),
        ("S4H", f"1010/{h[3][0]}/2024"),
        ("S4P", f"1010/{p[1][0]}/2024"),
    ]
    assert {i.kind for i in invalidations} == {InvalidationKind.CANCELLED}
    assert all(i.connector == CONNECTOR for i in invalidations)
    letters = events_on_topic(settings, topics.dlq, DeadLetter)
    assert sorted(letter.reason_code for letter in letters) == [
        "entity_not_found",
        "invalid_cloudevent",
    ]
    # Each event read from its own system (with that system's login), nothing from the other:
    # S4H h0, h1 twice, h2 and h3 for their cancellations' entity ids, h2's voided create, h3.
    assert (_entity_reads(s4h), _entity_reads(s4p)) == (7, 5)
    # Each letter names its source event (ids and digests): what a restart reads back.
    assert dead_lettered_events(settings, topics.dlq, EPOCH) == {
        f"event:{event_request_id('S4P', 'e-6', p_s)}",
        malformed_letter_key(MALFORMED),
    }

    # A restart: what the first run handled is known again from the topics.
    again: list[tuple[dict[str, Any], str]] = [
        (_event(h[0], "e-1", h_s), "structured"),  # duplicate (from the requests topic)
        (_event(h[3], "c-2", h_s, EVENT_TYPE_CANCELED), "structured"),  # duplicate
        (_event(("404", "2024"), "e-6", p_s), "structured"),  # duplicate (from the DLQ)
        (_event(h[2], "e-9", h_s), "structured"),  # skipped: still cancelled
        (_event(h[4], "e-10", h_s), "structured"),  # request
    ]

    async def restarted(url: str, _connector: SapConnector) -> list[int]:
        async with aiohttp.ClientSession() as session:
            statuses = [await _deliver(session, url, event, mode) for event, mode in again]
            # The malformed body once more: a duplicate (its digest is in the DLQ).
            headers = {"Content-Type": "application/cloudevents+json"}
            async with session.post(url, data=MALFORMED, headers=headers) as answer:
                statuses.append(answer.status)
            return statuses

    statuses, stats = _run(settings, _routes(settings, s4h, s4p), restarted)
    assert statuses == [200] * (len(again) + 1)
    assert stats.outcomes == {
        "request": 1,
        "invalidation": 0,
        "duplicate": 4,
        "skipped": 1,
        "dead_letter": 0,
    }
    assert stats.dead_lettered == 0
    assert stats.outcomes_by_route["(malformed)"] == dict.fromkeys(OUTCOMES, 0) | {"duplicate": 1}
    assert len(events_on_topic(settings, topics.requests, InferenceRequest)) == 8
    assert len(events_on_topic(settings, topics.invalidations, Invalidation)) == 3
    assert len(events_on_topic(settings, topics.dlq, DeadLetter)) == 2
    assert _entity_reads(s4p) == 5, "a duplicate is answered before any read"


def test_the_handshake_needs_the_same_credentials_as_a_delivery(
    settings: Settings, systems: tuple[SapProtocolServer, SapProtocolServer]
) -> None:
    s4h, s4p = systems
    secret = "event-mesh-webhook-secret"
    security = security_from_options(
        auth="basic", environment={SECRET_VAR: secret}, username="event-mesh"
    )
    origin = {"WebHook-Request-Origin": "eventmesh.example.com"}

    def basic(password: str) -> dict[str, str]:
        pair = base64.b64encode(f"event-mesh:{password}".encode()).decode()
        return {**origin, "Authorization": f"Basic {pair}"}

    async def scenario(url: str, _connector: SapConnector) -> list[tuple[int, str | None]]:
        answers = []
        async with aiohttp.ClientSession() as session:
            for headers in (origin, basic("wrong-secret"), basic(secret)):
                async with session.options(url, headers=headers) as answer:
                    answers.append((answer.status, answer.headers.get("WebHook-Allowed-Origin")))
        return answers

    answers, stats = _run(settings, _routes(settings, s4h, s4p), scenario, security=security)
    assert answers == [(401, None), (401, None), (200, "eventmesh.example.com")]
    assert stats.auth_failures == 2
    assert stats.events == 0, "a handshake is no event"


def _result(request: InferenceRequest, score: float) -> InferenceResult:
    tensor = Tensor(
        name="score",
        datatype=TensorDatatype.FP32,
        shape=[1, 1],
        data=np.array([[score]], dtype="<f4").tobytes(),
    )
    return InferenceResult(
        request_id=request.request_id,
        correlation_id=request.correlation_id,
        status=ResultStatus.OK,
        model=MODEL,
        model_version="1",
        outputs=Outputs(tensors=[tensor]),
    )


def test_release_is_called_with_typed_parameters_only_below_the_risk_threshold(
    settings: Settings, systems: tuple[SapProtocolServer, SapProtocolServer]
) -> None:
    s4h, s4p = systems
    h = invoices_from_features(s4h, generate(4, seed=47).x)
    p = invoices_from_features(s4p, generate(4, seed=53).x)
    writeback = {
        "method": "action",
        "action": "Release",
        "output": "score",
        "parameters": {
            "Note": "risk {score:.2f}",
            "Approved": {"value": "true", "type": "Edm.Boolean"},
            "RiskScore": {"value": "{score:.4f}", "type": "Edm.Decimal"},
        },
        "only_if": {"below": 0.5},
    }
    # The score of each invoice, by number: two of each system are below the threshold.
    scores = [0.125, 0.75, 0.25, 0.875]
    events = [_event(key, f"w-{i}", S4H_SOURCE) for i, key in enumerate(h)] + [
        _event(key, f"w-{i}", S4P_SOURCE) for i, key in enumerate(p)
    ]
    topics = ModelTopics(settings.namespace, MODEL)

    async def scenario(url: str, connector: SapConnector) -> None:
        async with aiohttp.ClientSession() as session:
            assert [await _deliver(session, url, event) for event in events] == [200] * 8
        # Results as a worker would write them (the correlation id copied from the request).
        requests = await asyncio.to_thread(
            events_on_topic, settings, topics.requests, InferenceRequest
        )
        number = {str(r.request_id): r.source.entity_id.split("/")[1] for r in requests if r.source}
        first = int(h[0][0])
        results = [_result(r, scores[int(number[str(r.request_id)]) - first]) for r in requests]
        await asyncio.to_thread(
            publish,
            settings,
            topics.results,
            ((str(r.request_id).encode(), schemas.encode(r)) for r in results),
        )
        await _until(
            lambda: connector.stats.written + connector.stats.skipped == 8,
            120,
            "every result written or skipped",
        )

    _, stats = _run(settings, _routes(settings, s4h, s4p, writeback), scenario, writeback=True)
    assert (stats.written, stats.skipped) == (4, 4)
    assert dict(stats.skips) == {"condition_not_met": 4}
    for server, keys in ((s4h, h), (s4p, p)):
        assert len(server.modifying_calls()) == 2, "one Release per invoice below 0.5, no other"
        released = server.writes_by_key()
        assert sorted(released) == sorted([keys[0], keys[2]])
        bodies = [write.body for writes in released.values() for write in writes]
        assert sorted(bodies, key=lambda b: b["RiskScore"]) == [
            {"Note": "risk 0.12", "Approved": True, "RiskScore": Decimal("0.1250")},
            {"Note": "risk 0.25", "Approved": True, "RiskScore": Decimal("0.2500")},
        ]


def test_connect_sap_with_a_config_file_prints_the_outcome_table(
    settings: Settings,
    systems: tuple[SapProtocolServer, SapProtocolServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s4h, s4p = systems
    h = invoices_from_features(s4h, generate(2, seed=59).x)
    p = invoices_from_features(s4p, generate(1, seed=61).x)
    for system in ("S4H", "S4P"):
        data = yaml.safe_load(MAPPING.read_text())
        data["source_system"] = system
        data["source"]["event_types"] = [EVENT_TYPE_CREATED, EVENT_TYPE_CANCELED]
        (tmp_path / f"{system}.yaml").write_text(yaml.safe_dump(data))
    config = {
        "systems": [
            {
                "name": "S4H",
                "base_url": s4h.base_url,
                "credentials_env": "SAP_S4H",
                "event_sources": [S4H_SOURCE],
            },
            {
                "name": "S4P",
                "base_url": s4p.base_url,
                "credentials_env": "SAP_S4P",
                "event_sources": [S4P_SOURCE],
            },
        ],
        "mappings": [{"file": "S4H.yaml", "system": "S4H"}, {"file": "S4P.yaml", "system": "S4P"}],
    }
    (tmp_path / "connector.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = ServiceProcess(
        settings,
        [
            "connect-sap",
            "--connector-config",
            str(tmp_path / "connector.yaml"),
            "--name",
            CONNECTOR,
            "--listen",
            f"127.0.0.1:{port}",
            "--webhook-auth",
            "none",
            "--no-writeback",
        ],
        tmp_path / "connector.log",
        extra_environment={
            ENV_VARIABLE: SECRET.decode(),
            "SAP_S4H_USERNAME": s4h.username,
            "SAP_S4H_PASSWORD": s4h.password,
            "SAP_S4P_USERNAME": s4p.username,
            "SAP_S4P_PASSWORD": s4p.password,
        },
    )
    url = f"http://127.0.0.1:{port}/events"
    events = [
        _event(h[0], "x-1", S4H_SOURCE),
        _event(p[0], "x-1", S4P_SOURCE),
        _event(h[1], "x-2", S4H_SOURCE, EVENT_TYPE_CANCELED),
        _event(h[0], "x-3", S4H_SOURCE, EVENT_TYPE_CHANGED),  # not listed: skipped
        _event(h[0], "x-1", S4H_SOURCE),  # duplicate
    ]
    with process:

        def answers() -> bool:
            assert not process.exited(), process.tail()
            try:
                return httpx2.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            except httpx2.TransportError:
                return False

        wait_for(answers, 60, f"the connector's receiver\n{process.tail()}")
        report = push_events(url, events, concurrency=1)
        assert process.stop() == 0
    assert report.attempts == len(events)
    output = (tmp_path / "connector.log").read_text()
    total = next(line for line in output.splitlines() if line.startswith("total "))
    assert total.split() == ["total", "2", "1", "1", "1", "0", "5"]
    assert "S4P/A_SupplierInvoice" in output
