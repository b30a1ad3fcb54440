"""The secured stack's Kafka secrets, tokens and broker properties, without a broker."""

from __future__ import annotations

import base64
import json
import stat
import threading
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from devkit.settings import load_local_settings
from devkit.stack.exceptions import StackError
from devkit.stack.kafka_security import (
    PRINCIPAL_MAPPING_RULES,
    credential_environment,
    secured_listener_properties,
)
from devkit.stack.oauth import AUDIENCE, ISSUER, ensure_issuer, mint_token
from devkit.stack.secrets import KafkaSecrets
from devkit.stack.services import KafkaService
from pipeline.settings import Settings
from sluiceway import main


def _secured(tmp_path: Path, secured: bool = True) -> Settings:
    return load_local_settings(stack={"secured": secured, "state_dir": str(tmp_path)})


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_a_password_is_generated_once_per_principal_and_kept_owner_only(tmp_path: Path) -> None:
    secrets = KafkaSecrets(tmp_path)
    first = secrets.password("worker-scaler")
    assert len(first) >= 40
    assert KafkaSecrets(tmp_path).password("worker-scaler") == first
    assert secrets.password("monitor") != first
    stored = tmp_path / "secrets" / "kafka-users" / "worker-scaler"
    assert _mode(stored) == 0o600
    assert _mode(stored.parent) == 0o700


def test_racing_processes_agree_on_one_password(tmp_path: Path) -> None:
    seen: list[str] = []
    threads = [
        threading.Thread(target=lambda: seen.append(KafkaSecrets(tmp_path).password("batch")))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 8
    assert len(set(seen)) == 1


@pytest.mark.parametrize("principal", ["../admin", "a/b", "", ".hidden", "a b", "x\n", "*"])
def test_a_principal_name_cannot_escape_the_secrets_folder(tmp_path: Path, principal: str) -> None:
    with pytest.raises(StackError, match="not a principal name"):
        KafkaSecrets(tmp_path).password(principal)
    with pytest.raises(StackError, match="not a principal name"):
        KafkaSecrets(tmp_path).client_pair(principal)
    assert not (tmp_path / "admin").exists()


def test_a_token_verifies_against_the_published_jwks_and_names_its_subject(
    tmp_path: Path,
) -> None:
    issuer = ensure_issuer(tmp_path)
    assert _mode(issuer.key_file) == 0o600
    token = issuer.token("worker-scaler", lifetime_s=60)
    header_b64, claims_b64, signature_b64 = token.split(".")
    (published,) = json.loads(issuer.jwks_file.read_text())["keys"]
    header = json.loads(_unb64(header_b64))
    claims = json.loads(_unb64(claims_b64))
    assert header == {"alg": "RS256", "typ": "JWT", "kid": published["kid"]}
    assert claims["sub"] == "worker-scaler"
    assert (claims["iss"], claims["aud"]) == (ISSUER, AUDIENCE)
    assert claims["exp"] - claims["iat"] == 60
    public = rsa.RSAPublicNumbers(
        int.from_bytes(_unb64(published["e"]), "big"),
        int.from_bytes(_unb64(published["n"]), "big"),
    ).public_key()
    signed = f"{header_b64}.{claims_b64}".encode()
    public.verify(_unb64(signature_b64), signed, padding.PKCS1v15(), hashes.SHA256())

    forged = mint_token(
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "worker-scaler",
        kid=published["kid"],
    )
    forged_header, forged_claims, forged_signature = forged.split(".")
    with pytest.raises(InvalidSignature):
        public.verify(
            _unb64(forged_signature),
            f"{forged_header}.{forged_claims}".encode(),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    # The issuer key is kept: a second call publishes the same key.
    assert ensure_issuer(tmp_path).jwks_file.read_text() == issuer.jwks_file.read_text()


def test_secured_broker_has_no_plaintext_listener_and_denies_without_an_acl(
    tmp_path: Path,
) -> None:
    properties = secured_listener_properties(_secured(tmp_path))
    protocols = dict(
        pair.split(":") for pair in properties["listener.security.protocol.map"].split(",")
    )
    listeners = [entry.split("://")[0] for entry in properties["listeners"].split(",")]
    assert {protocols[name] for name in listeners} <= {"SSL", "SASL_SSL"}
    assert all("127.0.0.1:" in entry for entry in properties["listeners"].split(","))
    assert properties["allow.everyone.if.no.acl.found"] == "false"
    assert properties["super.users"] == "User:admin"
    assert properties["listener.name.mtls.ssl.client.auth"] == "required"
    assert properties["sasl.oauthbearer.jwt.validator.class"].endswith(".BrokerJwtValidator")
    assert properties["ssl.keystore.type"] == "PEM"
    assert _mode(Path(properties["ssl.keystore.location"])) == 0o600
    assert PRINCIPAL_MAPPING_RULES.startswith("RULE:^CN=(")


def test_plain_stack_keeps_its_two_plaintext_ports(tmp_path: Path) -> None:
    plain = KafkaService(_secured(tmp_path, secured=False))
    assert [port.number for port in plain.ports()] == [9092, 9093]
    assert "PLAINTEXT://" in plain._server_properties()["listeners"]
    secured = KafkaService(_secured(tmp_path))
    assert [port.number for port in secured.ports()] == [9092, 9093, 9094, 9095]


def test_credentials_are_env_lines_for_scram_and_mtls_and_refused_otherwise(
    tmp_path: Path,
) -> None:
    settings = _secured(tmp_path)
    scram = credential_environment(settings, "monitor", "scram")
    assert scram["SLUICEWAY_KAFKA__SASL_USERNAME"] == "monitor"
    assert scram["SLUICEWAY_KAFKA__SASL_PASSWORD"] == KafkaSecrets(tmp_path).password("monitor")
    assert scram["SLUICEWAY_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL"
    mtls = credential_environment(settings, "monitor", "mtls")
    assert mtls["SLUICEWAY_KAFKA__BOOTSTRAP_SERVERS"] == "127.0.0.1:9094"
    assert Path(mtls["SLUICEWAY_KAFKA__SSL_KEY_LOCATION"]).is_file()
    with pytest.raises(StackError, match="no OAuth token endpoint"):
        credential_environment(settings, "monitor", "oauth")
    with pytest.raises(StackError, match="not secured"):
        credential_environment(_secured(tmp_path, secured=False), "monitor", "scram")


def test_a_data_folder_formatted_in_the_other_mode_is_refused(tmp_path: Path) -> None:
    kafka = KafkaService(_secured(tmp_path))
    (kafka.home / "data").mkdir(parents=True)
    (kafka.home / "data" / "meta.properties").write_text("cluster.id=x\n")
    with pytest.raises(StackError, match="formatted for the plain stack"):
        kafka._check_mode()
    (kafka.home / "mode").write_text("secured\n")
    kafka._check_mode()
    with pytest.raises(StackError, match="formatted for the secured stack"):
        KafkaService(_secured(tmp_path, secured=False))._check_mode()


def test_stack_credentials_prints_env_lines_and_refuses_odd_principals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SLUICEWAY_STACK__SECURED", "true")
    monkeypatch.setenv("SLUICEWAY_STACK__STATE_DIR", str(tmp_path))
    assert main(["stack", "credentials", "worker-scaler"]) == 0
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["SLUICEWAY_KAFKA__SASL_USERNAME"] == "worker-scaler"
    assert lines["SLUICEWAY_KAFKA__SASL_PASSWORD"] == KafkaSecrets(tmp_path).password(
        "worker-scaler"
    )
    assert main(["stack", "credentials", "../admin"]) == 2
    assert "not a principal name" in capsys.readouterr().err
    assert main(["stack", "token", "monitor"]) == 0
    assert capsys.readouterr().out.count(".") == 2


def test_acl_plan_command_prints_every_grant_and_refuses_a_bad_connector(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["acl", "plan", "--local-stack", "--connector", "erp=scaler"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].endswith("ACLs for 7 principals")
    assert any("User:connector-erp" in line and "inference.scaler.requests" in line for line in out)
    assert main(["acl", "plan", "--local-stack", "--connector", "erp=ghost"]) == 2
    assert "'ghost'" in capsys.readouterr().err
