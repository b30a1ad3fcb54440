"""The secured stack's MinIO on disk: TLS folder, KMS key, and how the server is launched."""

from __future__ import annotations

import base64
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from devkit.settings import load_local_settings
from devkit.stack.minio_security import (
    CERTS_FOLDER,
    KMS_KEY_FILE,
    ensure_kms_key,
    prepare_certs_dir,
)
from devkit.stack.services import MinioService


def test_certs_dir_holds_a_loopback_server_certificate_signed_by_the_stack_ca(
    tmp_path: Path,
) -> None:
    secrets = tmp_path / "secrets"
    certs = prepare_certs_dir(secrets)
    assert certs == secrets / CERTS_FOLDER
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    assert stat.S_IMODE((certs / "private.key").stat().st_mode) == 0o600
    assert (certs / "CAs" / "ca.pem").read_bytes() == (secrets / "ca.pem").read_bytes()
    # The pair loads as a server identity, and a client trusting only the CA accepts it.
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(certs / "public.crt", certs / "private.key")
    certificate = x509.load_pem_x509_certificate((certs / "public.crt").read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    ca = x509.load_pem_x509_certificate((secrets / "ca.pem").read_bytes())
    certificate.verify_directly_issued_by(ca)


def test_certs_dir_is_stable_across_restarts(tmp_path: Path) -> None:
    first = (prepare_certs_dir(tmp_path) / "public.crt").read_bytes()
    assert (prepare_certs_dir(tmp_path) / "public.crt").read_bytes() == first


def test_kms_key_is_generated_once_private_and_well_formed(tmp_path: Path) -> None:
    value = ensure_kms_key(tmp_path)
    name, key = value.split(":")
    assert name == "sluiceway-stack"
    assert len(base64.b64decode(key, validate=True)) == 32
    assert stat.S_IMODE((tmp_path / KMS_KEY_FILE).stat().st_mode) == 0o600
    assert ensure_kms_key(tmp_path) == value
    assert ensure_kms_key(tmp_path / "other") != value


@pytest.mark.parametrize(
    "content",
    ["", "no-colon", "name:c2hvcnQ=", "name:" + "A" * 43 + "=\nextra", "na me:" + "A" * 43 + "="],
)
def test_a_damaged_kms_key_is_never_replaced(tmp_path: Path, content: str) -> None:
    path = tmp_path / KMS_KEY_FILE
    path.write_text(content)
    with pytest.raises(ValueError, match="does not hold a MinIO KMS key"):
        ensure_kms_key(tmp_path)
    assert path.read_text() == content


def _service(tmp_path: Path, *, secured: bool) -> MinioService:
    settings = load_local_settings(stack={"state_dir": str(tmp_path / "state"), "secured": secured})
    service = MinioService(settings)
    service._binary = Path("/bin/minio-not-started")  # prepare() only builds the command line
    return service


def test_plain_stack_launch_is_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINIO_KMS_SECRET_KEY", raising=False)
    service = _service(tmp_path, secured=False)
    launch = service.prepare()
    assert "--certs-dir" not in launch.argv
    assert "MINIO_KMS_SECRET_KEY" not in launch.env
    assert not service.secrets_dir.exists()
    store = service.client_settings()
    assert (store.secure, store.ca_location) == (False, None)


def test_secured_stack_launches_with_tls_and_kms_and_clients_trust_its_ca(tmp_path: Path) -> None:
    service = _service(tmp_path, secured=True)
    launch = service.prepare()
    certs = Path(launch.argv[launch.argv.index("--certs-dir") + 1])
    assert (certs / "public.crt").is_file()
    assert launch.env["MINIO_KMS_SECRET_KEY"] == ensure_kms_key(service.secrets_dir)
    store = service.client_settings()
    assert store.secure
    assert store.ca_location == service.secrets_dir / "ca.pem"
    assert store.endpoint == service.endpoint()
    assert not service.healthy()  # nothing listens: the probe says so instead of raising
