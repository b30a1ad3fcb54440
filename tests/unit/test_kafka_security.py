"""Kafka security settings: each mode becomes exactly the librdkafka and aiokafka/faust
configuration it means, and every inconsistent or hostile combination is refused at load."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from faust.auth import OAuthCredentials, SASLCredentials, SSLCredentials
from pydantic import SecretStr

from devkit.stack.tls import Authority, ensure_authority
from pipeline.kafka import clients
from pipeline.kafka.clients import ConsumerRole, ProducerRole
from pipeline.kafka.oauth import FileTokenProvider, OidcTokenProvider
from pipeline.settings import KafkaSettings, SettingsError, load_settings

BROKERS = "broker-1:9093"


def _jwt(claims: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return ensure_authority(tmp_path / "tls")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token.jwt"
    path.write_text(_jwt({"sub": "worker-scaler", "exp": time.time() + 600}) + "\n")
    return path


def _settings(**values: Any) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=BROKERS, client_id="svc", **values)


# ---------------------------------------------------------------- each mode, librdkafka


def test_scram_over_tls(authority: Authority) -> None:
    kafka = _settings(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="worker-scaler",
        sasl_password=SecretStr("s3cret"),
        ssl_ca_location=authority.certificate,
    )
    assert kafka.client_config() == {
        "bootstrap.servers": BROKERS,
        "client.id": "svc",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "worker-scaler",
        "sasl.password": "s3cret",
        "ssl.ca.location": str(authority.certificate),
    }


def test_mutual_tls(tmp_path: Path, authority: Authority) -> None:
    pair = authority.issue_client(tmp_path / "tls", "worker-scaler")
    kafka = _settings(
        security_protocol="SSL",
        ssl_ca_location=authority.certificate,
        ssl_certificate_location=pair.certificate,
        ssl_key_location=pair.key,
        ssl_key_password=SecretStr("key-pass"),
    )
    assert kafka.client_config() == {
        "bootstrap.servers": BROKERS,
        "client.id": "svc",
        "security.protocol": "SSL",
        "ssl.ca.location": str(authority.certificate),
        "ssl.certificate.location": str(pair.certificate),
        "ssl.key.location": str(pair.key),
        "ssl.key.password": "key-pass",
    }


def test_oauthbearer_through_an_oidc_token_endpoint(authority: Authority) -> None:
    kafka = _settings(
        security_protocol="SASL_SSL",
        sasl_mechanism="OAUTHBEARER",
        ssl_ca_location=authority.certificate,
        oauth_token_endpoint_url="https://idp.example.com/oauth2/token",
        oauth_client_id="worker-scaler",
        oauth_client_secret=SecretStr("client-secret"),
        oauth_scope="kafka kafka:write",
    )
    assert kafka.client_config() == {
        "bootstrap.servers": BROKERS,
        "client.id": "svc",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "OAUTHBEARER",
        "sasl.oauthbearer.method": "oidc",
        "sasl.oauthbearer.token.endpoint.url": "https://idp.example.com/oauth2/token",
        "sasl.oauthbearer.client.id": "worker-scaler",
        "sasl.oauthbearer.client.secret": "client-secret",
        "sasl.oauthbearer.scope": "kafka kafka:write",
        "ssl.ca.location": str(authority.certificate),
        "https.ca.location": str(authority.certificate),
    }


def test_oauthbearer_from_a_token_file_gets_the_token_callback_in_every_client(
    token_file: Path, authority: Authority
) -> None:
    kafka = _settings(
        security_protocol="SASL_SSL",
        sasl_mechanism="OAUTHBEARER",
        ssl_ca_location=authority.certificate,
        oauth_token_file=token_file,
    )
    assert kafka.client_config() == {
        "bootstrap.servers": BROKERS,
        "client.id": "svc",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "OAUTHBEARER",
        "ssl.ca.location": str(authority.certificate),
    }
    configs = [clients.admin_config(kafka)]
    configs += [
        clients.producer_config(kafka, role=role)
        for role in ProducerRole
        if role != "transactional"
    ]
    configs += [clients.consumer_config(kafka, group_id="g", role=role) for role in ConsumerRole]
    for config in configs:
        callback: Any = config["oauth_cb"]
        token, expires_at, principal = callback("")
        assert token == token_file.read_text().strip()
        assert principal == "worker-scaler"
        assert expires_at > time.time()


def test_a_rotated_token_file_is_read_again(token_file: Path) -> None:
    kafka = _settings(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="OAUTHBEARER",
        oauth_token_file=token_file,
    )
    callback: Any = clients.admin_config(kafka)["oauth_cb"]
    first = callback("")[0]
    token_file.write_text(_jwt({"sub": "worker-scaler", "exp": time.time() + 1200}))
    assert callback("")[0] != first


def test_confluent_kafka_accepts_every_mode(
    tmp_path: Path, authority: Authority, token_file: Path
) -> None:
    """librdkafka refuses unknown or misspelt properties when a client is built."""
    pair = authority.issue_client(tmp_path / "tls", "monitor")
    modes = [
        _settings(
            security_protocol="SSL",
            ssl_ca_location=authority.certificate,
            ssl_certificate_location=pair.certificate,
            ssl_key_location=pair.key,
        ),
        _settings(
            security_protocol="SASL_SSL",
            sasl_mechanism="OAUTHBEARER",
            ssl_ca_location=authority.certificate,
            oauth_token_endpoint_url="http://127.0.0.1:9/token",
            oauth_client_id="monitor",
            oauth_client_secret=SecretStr("x"),
            oauth_scope="kafka",
        ),
        _settings(
            security_protocol="SASL_SSL",
            sasl_mechanism="OAUTHBEARER",
            ssl_ca_location=authority.certificate,
            oauth_token_file=token_file,
        ),
    ]
    for kafka in modes:
        clients.producer(kafka, role=ProducerRole.RELIABLE).flush(0)
        clients.consumer(kafka, group_id="g", role=ConsumerRole.READER).close()
        clients.admin(kafka)


# ---------------------------------------------------------------- each mode, aiokafka and faust


def test_plaintext_needs_no_credentials() -> None:
    kafka = _settings()
    assert clients.aiokafka_security(kafka) == {"security_protocol": "PLAINTEXT"}
    assert clients.faust_credentials(kafka) is None


def test_scram_over_tls_for_aiokafka_and_faust(authority: Authority) -> None:
    kafka = _settings(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="monitor",
        sasl_password=SecretStr("s3cret"),
        ssl_ca_location=authority.certificate,
    )
    security = clients.aiokafka_security(kafka)
    context = security.pop("ssl_context")
    assert security == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "monitor",
        "sasl_plain_password": "s3cret",
    }
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    credentials = clients.faust_credentials(kafka)
    assert isinstance(credentials, SASLCredentials)
    assert (credentials.protocol.value, credentials.mechanism.value) == (
        "SASL_SSL",
        "SCRAM-SHA-512",
    )
    assert (credentials.username, credentials.password) == ("monitor", "s3cret")
    assert credentials.ssl_context is not None


def test_scram_without_tls_for_faust() -> None:
    kafka = _settings(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="monitor",
        sasl_password=SecretStr("s3cret"),
    )
    assert clients.aiokafka_security(kafka) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "monitor",
        "sasl_plain_password": "s3cret",
    }
    credentials = clients.faust_credentials(kafka)
    assert isinstance(credentials, SASLCredentials)
    assert (credentials.protocol.value, credentials.mechanism.value) == ("SASL_PLAINTEXT", "PLAIN")


def test_oauthbearer_for_aiokafka_and_faust(token_file: Path, authority: Authority) -> None:
    oidc = _settings(
        security_protocol="SASL_SSL",
        sasl_mechanism="OAUTHBEARER",
        ssl_ca_location=authority.certificate,
        oauth_token_endpoint_url="https://idp.example.com/token",
        oauth_client_id="monitor",
        oauth_client_secret=SecretStr("client-secret"),
    )
    security = clients.aiokafka_security(oidc)
    assert set(security) == {
        "security_protocol",
        "sasl_mechanism",
        "ssl_context",
        "sasl_oauth_token_provider",
    }
    assert (security["security_protocol"], security["sasl_mechanism"]) == (
        "SASL_SSL",
        "OAUTHBEARER",
    )
    assert isinstance(security["sasl_oauth_token_provider"], OidcTokenProvider)
    credentials = clients.faust_credentials(oidc)
    assert isinstance(credentials, OAuthCredentials)
    assert credentials.protocol.value == "SASL_SSL"
    assert isinstance(credentials.oauth_cb, OidcTokenProvider)

    from_file = _settings(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="OAUTHBEARER",
        oauth_token_file=token_file,
    )
    security = clients.aiokafka_security(from_file)
    assert isinstance(security.pop("sasl_oauth_token_provider"), FileTokenProvider)
    assert security == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "OAUTHBEARER"}
    file_credentials = clients.faust_credentials(from_file)
    assert isinstance(file_credentials, OAuthCredentials)
    assert file_credentials.protocol.value == "SASL_PLAINTEXT"


def test_tls_only_for_faust(authority: Authority) -> None:
    credentials = clients.faust_credentials(
        _settings(security_protocol="SSL", ssl_ca_location=authority.certificate)
    )
    assert isinstance(credentials, SSLCredentials)
    assert credentials.protocol.value == "SSL"


def _serve_once(authority: Authority, folder: Path, seen: list[str | None]) -> int:
    """A TLS server on loopback that requires a client certificate; returns its port."""
    server_pair = authority.issue_server(folder, "kafka")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(server_pair.certificate, server_pair.key)
    server.load_verify_locations(authority.certificate)
    server.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        with listener:
            connection, _ = listener.accept()
            try:
                with server.wrap_socket(connection, server_side=True) as tls:
                    peer = tls.getpeercert() or {}
                    names = [pair for rdn in peer.get("subject", ()) for pair in rdn]
                    seen.extend(str(value) for key, value in names if key == "commonName")
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                seen.append(None)

    threading.Thread(target=accept, daemon=True).start()
    return int(listener.getsockname()[1])


def test_the_python_tls_context_presents_the_client_certificate(
    tmp_path: Path, authority: Authority
) -> None:
    """A real handshake with a server that requires mTLS sees the configured principal."""
    pair = authority.issue_client(tmp_path / "tls", "monitor")
    kafka = _settings(
        security_protocol="SSL",
        ssl_ca_location=authority.certificate,
        ssl_certificate_location=pair.certificate,
        ssl_key_location=pair.key,
    )
    seen: list[str | None] = []
    port = _serve_once(authority, tmp_path / "tls", seen)
    context = clients.aiokafka_security(kafka)["ssl_context"]
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.recv(2) == b"ok"
    assert seen == ["monitor"]


def test_the_python_tls_context_refuses_a_broker_the_ca_did_not_sign(
    tmp_path: Path, authority: Authority
) -> None:
    stranger = ensure_authority(tmp_path / "stranger")
    kafka = _settings(security_protocol="SSL", ssl_ca_location=stranger.certificate)
    seen: list[str | None] = []
    port = _serve_once(authority, tmp_path / "tls", seen)
    context = clients.aiokafka_security(kafka)["ssl_context"]
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(raw, server_hostname="127.0.0.1")


# ---------------------------------------------------------------- refused at load


def _write(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.write_text("pem\n")
    return str(path)


def _refusals(tmp_path: Path) -> list[tuple[dict[str, Any], str]]:
    ca, cert, key = (_write(tmp_path, n) for n in ("ca.pem", "c.pem", "k.pem"))
    scram = {"sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u", "sasl_password": "p"}
    oauth = {"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"}
    oidc = {
        **oauth,
        "oauth_token_endpoint_url": "https://idp/token",
        "oauth_client_id": "c",
        "oauth_client_secret": "s",
    }
    missing = str(tmp_path / "nowhere.pem")
    return [
        # mTLS halves, and TLS files without TLS
        ({"security_protocol": "SSL", "ssl_certificate_location": cert}, "go together"),
        ({"security_protocol": "SSL", "ssl_key_location": key}, "go together"),
        ({"security_protocol": "SSL", "ssl_key_password": "x"}, "needs ssl_key_location"),
        (
            {"ssl_certificate_location": cert, "ssl_key_location": key},
            "ssl_certificate_location needs security_protocol SSL or SASL_SSL, not PLAINTEXT",
        ),
        ({"ssl_ca_location": ca}, "ssl_ca_location needs security_protocol SSL"),
        # files that do not exist, or are not files
        ({"security_protocol": "SSL", "ssl_ca_location": missing}, "is not a file"),
        ({"security_protocol": "SSL", "ssl_ca_location": str(tmp_path)}, "is not a file"),
        (
            {
                "security_protocol": "SSL",
                "ssl_certificate_location": missing,
                "ssl_key_location": key,
            },
            "ssl_certificate_location",
        ),
        ({**oauth, "oauth_token_file": missing}, "oauth_token_file"),
        # SASL mechanism and protocol disagree
        (
            {**scram, "security_protocol": "SSL"},
            "needs security_protocol SASL_SSL or SASL_PLAINTEXT",
        ),
        ({**scram}, "not PLAINTEXT"),
        ({"security_protocol": "SASL_SSL"}, "needs a sasl_mechanism"),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"},
            "sasl_username and sasl_password",
        ),
        ({"sasl_username": "u"}, "used only by PLAIN and SCRAM"),
        (
            {**oauth, "sasl_username": "u", "oauth_token_file": _write(tmp_path, "t")},
            "only by PLAIN",
        ),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"}, "sasl_mechanism"),
        # OAUTHBEARER: a source of tokens, one only, complete
        (oauth, "needs oauth_token_endpoint_url"),
        ({**oidc, "oauth_token_file": _write(tmp_path, "t2")}, "alternatives"),
        ({**oauth, "oauth_token_endpoint_url": "https://idp/token"}, "oauth_client_id and"),
        ({**oidc, "oauth_client_secret": None}, "oauth_client_secret"),
        (
            {**oauth, "oauth_token_file": _write(tmp_path, "t3"), "oauth_scope": "a"},
            "not oauth_token_file",
        ),
        ({"oauth_token_endpoint_url": "https://idp/token"}, "only with sasl_mechanism OAUTHBEARER"),
        (
            {**scram, "security_protocol": "SASL_SSL", "oauth_client_id": "c"},
            "only with sasl_mechanism",
        ),
        # hostile endpoints, ids and scopes
        ({**oidc, "oauth_token_endpoint_url": "http://idp.example.com/token"}, "in clear"),
        ({**oidc, "oauth_token_endpoint_url": "ftp://idp/token"}, "must be an https:// URL"),
        ({**oidc, "oauth_token_endpoint_url": "file:///etc/passwd"}, "must be an https:// URL"),
        ({**oidc, "oauth_token_endpoint_url": "https:///token"}, "must be an https:// URL"),
        (
            {**oidc, "oauth_token_endpoint_url": "https://u:p@idp/token"},
            "must not hold credentials",
        ),
        ({**oidc, "oauth_token_endpoint_url": "https://idp/t oken"}, "control characters"),
        ({**oidc, "oauth_token_endpoint_url": "https://idp/token\n"}, "control characters"),
        ({**oidc, "oauth_token_endpoint_url": "https://idp:99999/token"}, "not a URL"),
        ({**oidc, "oauth_token_endpoint_url": "https://[::1/token"}, "not a URL"),
        ({**oidc, "oauth_client_id": "c\r\nX-Injected: 1"}, "printable ASCII"),
        ({**oidc, "oauth_client_id": "clïent"}, "printable ASCII"),
        ({**oidc, "oauth_scope": 'kafka "all"'}, "oauth_scope"),
        ({**oidc, "oauth_scope": "kafka  write"}, "oauth_scope"),
        ({**oidc, "oauth_scope": "kafka\nwrite"}, "oauth_scope"),
        ({**oidc, "oauth_scope": ""}, "oauth_scope"),
        ({"replication_factor": 0}, "replication_factor"),
        ({"min_insync_replicas": -1}, "min_insync_replicas"),
    ]


def test_inconsistent_or_hostile_settings_are_refused_with_one_line(tmp_path: Path) -> None:
    for values, expected in _refusals(tmp_path):
        with pytest.raises(SettingsError) as caught:
            load_settings(kafka=values)
        message = str(caught.value)
        assert "\n" not in message, values
        assert message.startswith("setting kafka"), message
        assert expected in message, (values, message)


def test_a_secret_in_a_refused_setting_is_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            kafka={
                "security_protocol": "SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": "u",
                "sasl_password": "hunter2-secret",
            }
        )
    assert "hunter2-secret" not in str(caught.value)


def test_plain_http_to_a_token_endpoint_on_this_machine_is_allowed() -> None:
    for host in ("127.0.0.1", "localhost", "[::1]"):
        kafka = _settings(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="OAUTHBEARER",
            oauth_token_endpoint_url=f"http://{host}:8080/token",
            oauth_client_id="c",
            oauth_client_secret=SecretStr("s"),
        )
        assert kafka.client_config()["sasl.oauthbearer.method"] == "oidc"


def test_a_ca_without_tls_is_allowed_for_the_token_endpoint(tmp_path: Path) -> None:
    kafka = _settings(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="OAUTHBEARER",
        ssl_ca_location=Path(_write(tmp_path, "ca.pem")),
        oauth_token_endpoint_url="https://idp/token",
        oauth_client_id="c",
        oauth_client_secret=SecretStr("s"),
    )
    assert kafka.client_config()["https.ca.location"] == str(tmp_path / "ca.pem")


def test_security_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, authority: Authority
) -> None:
    """What ``sluiceway stack credentials`` prints is how a process is configured."""
    pair = authority.issue_client(tmp_path / "tls", "worker-scaler")
    monkeypatch.setenv("SLUICEWAY_KAFKA__SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("SLUICEWAY_KAFKA__SSL_CA_LOCATION", str(authority.certificate))
    monkeypatch.setenv("SLUICEWAY_KAFKA__SSL_CERTIFICATE_LOCATION", str(pair.certificate))
    monkeypatch.setenv("SLUICEWAY_KAFKA__SSL_KEY_LOCATION", str(pair.key))
    kafka = load_settings().kafka
    assert kafka.ssl_certificate_location == pair.certificate
    rebuilt = load_settings().as_environment()
    assert json.loads(rebuilt["SLUICEWAY_KAFKA"])["ssl_key_location"] == str(pair.key)
