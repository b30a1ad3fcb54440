"""The secured stack's object store on a real MinIO: encrypted at rest, TLS only, and each
credential confined to its own folder.

The module starts its own secured MinIO (``stack.secured``) on ports 27000/27001 with a
temporary state folder, exactly as ``sluiceway stack up`` would, including the step that
encrypts the bucket and creates the scoped credentials.
"""

from __future__ import annotations

import asyncio
import io
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from pydantic import SecretStr

from devkit.settings import load_local_settings
from devkit.stack.process import port_open
from devkit.stack.services import MinioService
from devkit.stack.tls import ensure_authority
from pipeline.settings import ModelSettings, ObjectStoreSettings, Settings
from pipeline.storage.client import ensure_bucket, make_client
from pipeline.storage.exceptions import ObjectStoreError
from pipeline.storage.grants import credential_file, read_credential
from pipeline.storage.policies import BATCH_PRINCIPAL, MONITOR_PRINCIPAL, worker_principal
from pipeline.storage.segments import build_segment
from pipeline.storage.store import SegmentStore
from sluiceway import main
from tests.integration.waiting import wait_until
from workers.inference.contracts import dead_letter_offload_key

# Below the kernel's ephemeral range (32768-60999 here): a port in it can be taken at any
# moment as the local end of some outgoing connection, and MinIO then cannot bind it.
S3_PORT = 27000
CONSOLE_PORT = 27001


@dataclass(frozen=True)
class SecuredStore:
    settings: Settings
    service: MinioService
    root: ObjectStoreSettings
    """The stack's own (root) settings: https, trusting the stack CA."""

    @property
    def data_dir(self) -> Path:
        return self.service.home / "data"

    def scoped(self, principal: str) -> ObjectStoreSettings:
        """The settings a process started with ``<principal>.env`` would have."""
        found = read_credential(credential_file(self.service.credentials_dir, principal))
        assert found is not None, f"no credential file for {principal}"
        access, secret = found
        return self.root.model_copy(update={"access_key": access, "secret_key": SecretStr(secret)})


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredStore]:
    for port in (S3_PORT, CONSOLE_PORT):
        assert not port_open(port), f"port {port} is taken; this module's MinIO needs it"
    settings = load_local_settings(
        stack={
            "state_dir": str(tmp_path_factory.mktemp("secured-minio") / "state"),
            "secured": True,
            "minio_port": S3_PORT,
            "minio_console_port": CONSOLE_PORT,
        },
        object_store={"endpoint": f"127.0.0.1:{S3_PORT}"},
        models={"a": ModelSettings(), "ab": ModelSettings()},
    )
    service = MinioService(settings)
    service.install(print)
    launch = service.prepare()
    service.process.start(launch.argv, launch.env)
    try:
        wait_until(
            lambda: service.healthy() or service.process.running_pid() is None,
            settings.stack.start_timeout_s,
            "the secured MinIO to answer its https health check",
            poll_s=0.25,
        )
        assert service.healthy(), service.process.log_tail(20)
        service.configure(print)
        yield SecuredStore(settings, service, service.client_settings())
    finally:
        service.process.stop()


def _read(client: Minio, bucket: str, key: str) -> bytes:
    response = client.get_object(bucket, key)
    try:
        return bytes(response.read())
    finally:
        response.close()
        response.release_conn()


def _files_containing(folder: Path, needle: bytes) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and needle in path.read_bytes()]


def test_a_result_segment_is_not_plaintext_on_minio_disk(secured: SecuredStore) -> None:
    marker = f"CANARY-{uuid.uuid4().hex}"
    worker = secured.scoped(worker_principal("a"))
    store = SegmentStore(make_client(worker), worker.bucket)
    try:
        segment = build_segment(
            "a",
            "1",
            [{"request_id": "r1", "status": "ok", "note": marker}, {"request_id": "r2"}],
            ["r1", "r2"],
            datetime.now(UTC),
        )
        asyncio.run(store.put(segment))
    finally:
        store.close()
    root = make_client(secured.root)
    assert marker.encode() in _read(root, secured.root.bucket, segment.key)
    stat = root.stat_object(secured.root.bucket, segment.key)
    assert stat.metadata["x-amz-server-side-encryption"] == "AES256"
    # The object is on disk under its key, and nowhere there in the clear.
    assert (secured.data_dir / secured.root.bucket / segment.key).is_dir()
    assert _files_containing(secured.data_dir, marker.encode()) == []


def test_the_disk_walk_would_see_an_unencrypted_object(secured: SecuredStore) -> None:
    """Control for the test above: a bucket without default encryption stores the marker
    readably in the same data folder, so an empty walk there means encrypted."""
    marker = f"PLAIN-{uuid.uuid4().hex}".encode()
    root = make_client(secured.root)
    bucket = f"control-{uuid.uuid4().hex[:8]}"
    ensure_bucket(root, bucket)
    root.put_object(bucket, "plain.txt", io.BytesIO(marker), len(marker))
    assert _files_containing(secured.data_dir, marker) != []


def test_a_worker_credential_writes_only_inside_its_model_prefix(secured: SecuredStore) -> None:
    worker_store = secured.scoped(worker_principal("a"))
    worker = make_client(worker_store)
    bucket = worker_store.bucket
    ensure_bucket(worker, bucket)  # what the worker does at start: allowed without listing
    body = b'{"ok": true}\n'
    allowed = [
        "a/1/2026/03/01/inside.jsonl",
        dead_letter_offload_key("inference.a.requests", 0, 7),
        dead_letter_offload_key("inference.a.batch", 1, 8),
    ]
    for key in allowed:
        worker.put_object(bucket, key, io.BytesIO(body), len(body))
    assert _read(make_client(secured.root), bucket, allowed[0]) == body
    outside = [
        "ab/1/2026/03/01/outside.jsonl",
        "b/1/x.jsonl",
        "a.jsonl",
        dead_letter_offload_key("inference.ab.requests", 0, 7),
        "reports/a/2026/03/01/forged.html",
        "references/a/reference_sample.npz",
        "batch/job-1/manifest.json",
    ]
    for key in outside:
        with pytest.raises(S3Error) as refused:
            worker.put_object(bucket, key, io.BytesIO(body), len(body))
        assert refused.value.code == "AccessDenied", key
    # It reads nothing, not even its own segments, and lists nothing.
    with pytest.raises(S3Error) as unread:
        _read(worker, bucket, allowed[0])
    assert unread.value.code == "AccessDenied"
    with pytest.raises(S3Error) as unlisted:
        list(worker.list_objects(bucket, prefix="a/"))
    assert unlisted.value.code == "AccessDenied"


def test_the_products_segment_store_reports_a_write_outside_the_prefix(
    secured: SecuredStore,
) -> None:
    worker = secured.scoped(worker_principal("a"))
    store = SegmentStore(make_client(worker), worker.bucket)
    try:
        segment = build_segment("ab", "1", [{"request_id": "r"}], ["r"], datetime.now(UTC))
        with pytest.raises(ObjectStoreError, match="AccessDenied"):
            asyncio.run(store.put(segment))
    finally:
        store.close()


def test_batch_and_monitor_credentials_stay_in_their_folders(secured: SecuredStore) -> None:
    body = b"{}"
    bucket = secured.root.bucket
    batch = make_client(secured.scoped(BATCH_PRINCIPAL))
    batch.put_object(bucket, "batch/job-1/manifest.json", io.BytesIO(body), len(body))
    assert _read(batch, bucket, "batch/job-1/manifest.json") == body
    assert [o.object_name for o in batch.list_objects(bucket, prefix="batch/")] == ["batch/job-1/"]
    monitor = make_client(secured.scoped(MONITOR_PRINCIPAL))
    monitor.put_object(bucket, "reports/ab/2026/03/01/r.html", io.BytesIO(body), len(body))
    # A reference not yet published reads as missing (the monitor then publishes it), not as
    # a refusal: the grant covers the key even while no object is there.
    with pytest.raises(S3Error) as missing:
        _read(monitor, bucket, "references/a/reference_sample.npz")
    assert missing.value.code == "NoSuchKey"
    with pytest.raises(S3Error) as no_job:
        _read(batch, bucket, "batch/job-404/manifest.json")
    assert no_job.value.code == "NoSuchKey"
    for client, key in ((batch, "a/1/x.jsonl"), (monitor, "a/1/x.jsonl"), (monitor, "batch/j")):
        with pytest.raises(S3Error) as refused:
            client.put_object(bucket, key, io.BytesIO(body), len(body))
        assert refused.value.code == "AccessDenied"
    with pytest.raises(S3Error) as unlisted:
        list(batch.list_objects(bucket, prefix="a/"))
    assert unlisted.value.code == "AccessDenied"


def test_a_client_that_does_not_trust_the_stack_ca_is_refused(
    secured: SecuredStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    system_trust = secured.root.model_copy(update={"ca_location": None})
    other_ca = ensure_authority(tmp_path / "other-ca").certificate
    another_ca = secured.root.model_copy(update={"ca_location": other_ca})
    for store in (system_trust, another_ca):
        with pytest.raises(urllib3.exceptions.HTTPError) as refused:
            make_client(store).bucket_exists(store.bucket)
        assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    assert make_client(secured.root).bucket_exists(secured.root.bucket)


def test_plain_http_is_refused(secured: SecuredStore) -> None:
    plain = secured.root.model_copy(update={"secure": False, "ca_location": None})
    with pytest.raises((MinioException, urllib3.exceptions.HTTPError)):
        make_client(plain).bucket_exists(plain.bucket)
    pool = urllib3.PoolManager(retries=False)
    response = pool.request("GET", f"http://{plain.endpoint}/minio/health/ready")
    assert response.status == 400
    assert b"HTTP request to an HTTPS server" in response.data


def test_keys_and_credentials_on_disk_are_private(secured: SecuredStore) -> None:
    secrets = secured.service.secrets_dir
    private = [
        secrets / "minio-kms.key",
        secrets / "minio-certs" / "private.key",
        credential_file(secured.service.credentials_dir, worker_principal("a")),
    ]
    for path in private:
        assert os.stat(path).st_mode & 0o077 == 0, path


def test_grant_command_is_idempotent_and_keeps_credentials_working(
    secured: SecuredStore, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = secured.root
    assert root.ca_location is not None
    for name, value in {
        "ENDPOINT": root.endpoint,
        "SECURE": "true",
        "CA_LOCATION": str(root.ca_location),
    }.items():
        monkeypatch.setenv(f"SLUICEWAY_OBJECT_STORE__{name}", value)
    monkeypatch.setenv("SLUICEWAY_MODELS", '{"a": {}, "ab": {}}')
    folder = str(secured.service.credentials_dir)
    before = read_credential(credential_file(Path(folder), worker_principal("a")))
    for _ in range(2):
        assert main(["objectstore", "grant", "--credentials-dir", folder]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(worker_principal("ab") in line for line in lines) == 2
    assert read_credential(credential_file(Path(folder), worker_principal("a"))) == before
    worker = make_client(secured.scoped(worker_principal("a")))
    body = b"again"
    worker.put_object(root.bucket, "a/after-regrant.txt", io.BytesIO(body), len(body))
