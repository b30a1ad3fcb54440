"""The demo story on the secured stack: every process under its own principal, over TLS.

Requests, results, the reply, and the monitor's rollback all run as in ``test_demo.py``, but
the broker authenticates and authorises every client: the invoice worker presents a client
certificate (mTLS), the case worker signs in with OAUTHBEARER tokens from a file, the monitor
(faust and aiokafka) and the feeds use SCRAM-SHA-512 over SASL_SSL, and the operator's own
actions (topics, control events) are the stack's ``admin``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as AioTopicPartition
from confluent_kafka import KafkaException
from pydantic import SecretStr

from devkit.demo.run import MODEL, TEXT_MODEL, render_report, run_demo, worker_assignments
from devkit.modeling.invoices import FEATURES
from devkit.stack.oauth import ensure_issuer
from pipeline.client import InferTimeoutError, SluicewayClient
from pipeline.kafka import clients
from pipeline.kafka.acls import CLIENT, MONITOR, monitor_app_id, worker_principal
from pipeline.kafka.admin import TopicSpec, describe_topics, ensure_topics
from pipeline.kafka.clients import ProducerRole
from pipeline.settings import KafkaSettings, Settings
from pipeline.storage.client import make_client
from schemas.models import InferenceRequest, InferenceResult, Inputs, ResultStatus
from tests.integration.secured_stack import SecuredStack
from tests.integration.waiting import wait_for
from workers.inference.runner import prepare_topics_and_bucket
from workers.processes import Principals, ServiceProcess, as_principal

INVOICES = 200
CASES = 16


def _oauth_kafka(stack: SecuredStack, principal: str, folder: Path) -> KafkaSettings:
    """OAUTHBEARER with a token file, as a token projector (or ``sluiceway stack token``)
    would keep it: the stack's issuer signs a token for ``principal``."""
    token_file = folder / f"{principal}.jwt"
    token_file.write_text(ensure_issuer(stack.state_dir).token(principal) + "\n")
    return KafkaSettings(
        bootstrap_servers=f"127.0.0.1:{stack.settings.stack.kafka_oauth_port}",
        security_protocol="SASL_SSL",
        sasl_mechanism="OAUTHBEARER",
        ssl_ca_location=stack.ca_location,
        oauth_token_file=token_file,
        client_id=principal,
    )


def _principals(stack: SecuredStack, settings: Settings, folder: Path) -> Principals:
    def scram(principal: str) -> KafkaSettings:
        return stack.principal_settings(principal, "scram", base=settings).kafka

    return Principals(
        operator=stack.admin_kafka(),
        client=scram(CLIENT),
        monitor=scram(MONITOR),
        workers={
            MODEL: stack.principal_settings(worker_principal(MODEL), "mtls", base=settings).kafka,
            TEXT_MODEL: _oauth_kafka(stack, worker_principal(TEXT_MODEL), folder),
        },
    )


@pytest.fixture
def secured(secured_stack: SecuredStack) -> Settings:
    """A namespace of this test's own, with the planned ACLs in place for it."""
    return secured_stack.for_namespace(f"sec-{uuid.uuid4().hex[:8]}")


def test_the_demo_story_runs_with_every_process_as_its_own_principal(
    secured_stack: SecuredStack, secured: Settings, tmp_path: Path
) -> None:
    principals = _principals(secured_stack, secured, tmp_path)
    settings = as_principal(secured, principals.operator)
    lines: list[str] = []

    report = run_demo(
        settings,
        count=INVOICES,
        progress=lines.append,
        cases=CASES,
        rate=200.0,
        rollback_window_s=2.0,
        principals=principals,
    )

    assert report.published == report.results_read == report.results_correct == INVOICES
    assert report.statuses == {"ok": INVOICES + CASES}
    assert report.cases_published == report.cases_summarised == CASES
    assert report.explanations_where_asked == INVOICES
    assert report.dead_lettered == 0
    store = make_client(settings.object_store)
    for key in report.segments:
        assert store.stat_object(settings.object_store.bucket, key).size > 0
    # One worker process per model, each with its own principal.
    started = [line for line in lines if line.startswith("started `sluiceway worker")]
    assert len(started) == 2
    # The rollback: the monitor (faust over SASL_SSL as `monitor`) judged v2 and rolled back.
    story = report.story
    assert story is not None
    assert story.ok, "\n".join(lines)
    assert story.rollback is not None
    assert (story.rollback.from_version, story.rollback.to_version) == ("2", "1")
    assert story.rollback.issued_by is not None
    assert story.rollback.issued_by.startswith("monitor")
    assert story.first_breach is not None
    assert render_report(report).startswith("Sluiceway demo OK")
    # Topics are as durable as this one-broker cluster allows, and exist under the namespace.
    described = describe_topics(principals.operator, f"{secured.namespace}.")
    assert {row.replication_factor for row in described} == {1}


def test_a_reply_reaches_the_sdk_principal_through_the_secured_worker(
    secured_stack: SecuredStack, secured: Settings, tmp_path: Path
) -> None:
    """The SDK as ``client`` asks; the invoice worker (mTLS) answers on the client's own reply
    topic. As ``client``, the control topic stays out of sight."""
    principals = _principals(secured_stack, secured, tmp_path)
    client_settings = as_principal(secured, principals.client)
    ((worker_settings, models),) = worker_assignments(secured, [MODEL], principals)
    # The operator creates the topics, as in a deployment: `client` may write requests but
    # not create the topic (a produce to a missing topic is refused as unauthorised).
    prepare_topics_and_bucket(as_principal(secured, principals.operator), [MODEL])
    features = dict.fromkeys(FEATURES, 1.0)
    answered: list[InferenceResult] = []

    def ask(sdk: SluicewayClient) -> bool:
        request = InferenceRequest(
            request_id=uuid.uuid4(), model=MODEL, inputs=Inputs(features=features)
        )
        try:
            answered.append(sdk.infer(request, timeout_s=10))
        except InferTimeoutError:  # the worker is still joining its group
            return False
        return True

    with (
        ServiceProcess(worker_settings, ["worker", "--model", *models], tmp_path / "w.log") as w,
        SluicewayClient(client_settings) as sdk,
    ):
        wait_for(lambda: not w.exited() and ask(sdk), 120, "a reply from the secured worker")
    assert answered[0].status is ResultStatus.OK
    assert answered[0].model_version == "1"
    topics = clients.admin(client_settings.kafka).list_topics(timeout=10).topics
    assert sdk.reply_topic in topics
    assert f"{secured.namespace}.control" not in topics


class _TokenEndpoint:
    """An OIDC token endpoint on loopback (client credentials grant) that signs with the
    stack's issuer: what an identity provider is to a deployment."""

    def __init__(self, stack: SecuredStack, clients_allowed: dict[str, str]) -> None:
        issuer = ensure_issuer(stack.state_dir)
        self.grants: list[str] = []
        self.denied = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode())
                scheme, _, encoded = self.headers.get("Authorization", "").partition(" ")
                client_id, _, secret = base64.b64decode(encoded).decode().partition(":")
                client_id, secret = unquote(client_id), unquote(secret)
                granted = (
                    scheme == "Basic"
                    and form.get("grant_type") == ["client_credentials"]
                    and clients_allowed.get(client_id) == secret
                )
                if not granted:
                    endpoint.denied += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                endpoint.grants.append(client_id)
                body = json.dumps(
                    {
                        "access_token": issuer.token(client_id, 600),
                        "token_type": "Bearer",
                        "expires_in": 600,
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_oidc_client_credentials_sign_in_librdkafka_and_aiokafka_alike(
    secured_stack: SecuredStack, secured: Settings
) -> None:
    """One OIDC setting set: librdkafka (``sasl.oauthbearer.method=oidc``) produces and
    aiokafka (the monitor's client, through our token provider) reads, both as ``monitor``;
    a wrong client secret gets no token, hence no connection."""
    endpoint = _TokenEndpoint(secured_stack, {MONITOR: "monitor-secret"})

    def oidc(secret: str) -> KafkaSettings:
        return KafkaSettings(
            bootstrap_servers=f"127.0.0.1:{secured_stack.settings.stack.kafka_oauth_port}",
            security_protocol="SASL_SSL",
            sasl_mechanism="OAUTHBEARER",
            ssl_ca_location=secured_stack.ca_location,
            oauth_token_endpoint_url=endpoint.url,
            oauth_client_id=MONITOR,
            oauth_client_secret=SecretStr(secret),
            oauth_scope="kafka",
        )

    kafka = oidc("monitor-secret")
    # The monitor owns the topics under its faust app id.
    topic = f"{monitor_app_id(secured.namespace)}-oidc-probe"
    try:
        ensure_topics(kafka, [TopicSpec(topic, 1)])
        producer = clients.producer(kafka, role=ProducerRole.RELIABLE)
        for index in range(5):
            producer.produce(topic, f"event-{index}".encode())
        assert producer.flush(30) == 0

        async def read(settings: KafkaSettings) -> list[bytes]:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=settings.bootstrap_servers,
                auto_offset_reset="earliest",
                **clients.aiokafka_security(settings),
            )
            await consumer.start()
            try:
                consumer.assign([AioTopicPartition(topic, 0)])
                batches = await consumer.getmany(timeout_ms=10_000, max_records=5)
                return [m.value for records in batches.values() for m in records]
            finally:
                await consumer.stop()

        assert asyncio.run(read(kafka)) == [f"event-{i}".encode() for i in range(5)]
        assert endpoint.grants
        assert set(endpoint.grants) == {MONITOR}

        # A wrong secret gets no token, so no connection.
        refused = clients.admin(oidc("wrong-secret"), overrides={"socket.timeout.ms": 3000})
        with pytest.raises(KafkaException):
            refused.list_topics(timeout=5)
        assert endpoint.denied >= 1
    finally:
        endpoint.close()
