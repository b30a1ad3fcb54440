"""Object-store settings: the development secret stays on loopback, and trust settings hold
together (the rule is the one every process meets when it loads its settings)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pipeline.settings import (
    DEVELOPMENT_SECRET,
    SettingsError,
    development_secret_refusal,
    endpoint_host,
    load_settings,
)
from pipeline.storage.grants import (
    ACCESS_KEY_VARIABLE,
    SECRET_KEY_VARIABLE,
    credential_file,
    ensure_credential,
    read_credential,
)
from sluiceway import main

LOOPBACK = ["127.0.0.1:9000", "localhost:9000", "LocalHost:9000", "[::1]:9000", "127.8.9.10:1"]
REMOTE = [
    "minio.example.com:9000",
    "10.0.0.5:9000",
    "0.0.0.0:9000",  # every interface: reachable from outside
    "127.0.0.1.nip.io:9000",  # resolves to loopback today, anywhere tomorrow
    "localhost.example.com:9000",
    "localhost.:9000",
    "127.1:9000",  # no literal loopback address: counted as remote
    "127.0.0.1:9000@evil.example.com",  # user info: the client would go to evil.example.com
    "evil.example.com#@127.0.0.1:9000",
    "evil.example.com/127.0.0.1:9000",
    "127.0.0.1:notaport",
    "::1",  # a bare IPv6 address is no host:port
    "",
]


@pytest.mark.parametrize("endpoint", LOOPBACK)
def test_development_secret_is_accepted_on_loopback(endpoint: str) -> None:
    assert development_secret_refusal(endpoint, DEVELOPMENT_SECRET) is None
    assert load_settings(object_store={"endpoint": endpoint}).object_store.endpoint == endpoint


@pytest.mark.parametrize("endpoint", REMOTE)
def test_development_secret_is_refused_anywhere_else(endpoint: str) -> None:
    refusal = development_secret_refusal(endpoint, DEVELOPMENT_SECRET)
    assert refusal is not None
    assert "development secret" in refusal
    with pytest.raises(SettingsError) as caught:
        load_settings(object_store={"endpoint": endpoint})
    message = str(caught.value)
    assert "\n" not in message
    assert "object_store" in message
    assert "SLUICEWAY_OBJECT_STORE__SECRET_KEY" in message
    assert DEVELOPMENT_SECRET not in message.replace("development secret", "")


@pytest.mark.parametrize("endpoint", REMOTE[:3])
def test_any_other_secret_may_go_anywhere(endpoint: str) -> None:
    settings = load_settings(object_store={"endpoint": endpoint, "secret_key": "a-real-secret"})
    assert settings.object_store.endpoint == endpoint


def test_a_secret_that_only_looks_like_the_development_one_is_its_own_secret() -> None:
    for lookalike in (f" {DEVELOPMENT_SECRET}", DEVELOPMENT_SECRET.upper()):
        assert development_secret_refusal("minio.example.com:9000", lookalike) is None


def test_endpoint_host_is_what_a_client_would_connect_to() -> None:
    assert endpoint_host("[::1]:9000") == "::1"
    assert endpoint_host("MinIO.Example.com:9000") == "minio.example.com"
    assert endpoint_host("127.0.0.1:9000@evil.example.com") is None


def test_starting_a_process_with_the_development_secret_off_loopback_fails_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SLUICEWAY_OBJECT_STORE__ENDPOINT", "minio.prod.example.com:443")
    assert main(["settings"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("sluiceway: error: setting object_store from the environment")
    assert "development secret" in line
    assert "minio.prod.example.com:443" in line


def test_a_ca_without_tls_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="ca_location is set but secure is false"):
        load_settings(object_store={"ca_location": str(tmp_path / "ca.pem")})
    settings = load_settings(object_store={"ca_location": str(tmp_path / "ca.pem"), "secure": True})
    assert settings.object_store.ca_location == tmp_path / "ca.pem"


def test_a_credential_is_generated_once_private_and_reused(tmp_path: Path) -> None:
    folder = tmp_path / "objectstore"
    access, secret = ensure_credential(folder, "worker-a")
    path = credential_file(folder, "worker-a")
    assert access == "worker-a"
    assert 8 <= len(secret) <= 40  # MinIO's bounds for a secret key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == f"{ACCESS_KEY_VARIABLE}={access}\n{SECRET_KEY_VARIABLE}={secret}\n"
    assert ensure_credential(folder, "worker-a") == (access, secret)
    assert ensure_credential(folder, "worker-b")[1] != secret


def test_a_credential_file_for_someone_else_or_broken_is_replaced(tmp_path: Path) -> None:
    path = credential_file(tmp_path, "worker-a")
    for text in (
        f"{ACCESS_KEY_VARIABLE}=monitor\n{SECRET_KEY_VARIABLE}=xxxxxxxxxx\n",
        "garbage without equals\n",
        f"{ACCESS_KEY_VARIABLE}=worker-a\n",
    ):
        path.write_text(text)
        access, secret = ensure_credential(tmp_path, "worker-a")
        assert access == "worker-a"
        assert len(secret) == 40
        assert read_credential(path) == (access, secret)
