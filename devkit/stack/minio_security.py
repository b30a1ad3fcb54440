"""What the secured local stack's MinIO needs on disk: its TLS folder and its KMS key.

Both live under ``<state_dir>/secrets`` beside the stack's CA and are made once: restarting
the stack keeps the certificate clients trust and, above all, the key that encrypts the data
already stored (a new key would make every encrypted object unreadable).
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shutil
from pathlib import Path

from devkit.stack.tls import ensure_authority

KMS_KEY_NAME = "sluiceway-stack"
KMS_KEY_FILE = "minio-kms.key"
CERTS_FOLDER = "minio-certs"
_KMS_KEY = re.compile(r"[A-Za-z0-9_-]+:[A-Za-z0-9+/]{43}=")


def prepare_certs_dir(secrets_dir: Path) -> Path:
    """Return MinIO's ``--certs-dir``: ``public.crt`` and ``private.key`` (0600) of a server
    certificate for the loopback names, issued by the stack CA, and that CA in ``CAs/``."""
    _private_folder(secrets_dir)
    authority = ensure_authority(secrets_dir)
    pair = authority.issue_server(secrets_dir, "minio")
    certs = secrets_dir / CERTS_FOLDER
    (certs / "CAs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pair.certificate, certs / "public.crt")
    _write_private(certs / "private.key", pair.key.read_bytes())
    shutil.copyfile(authority.certificate, certs / "CAs" / "ca.pem")
    return certs


def ensure_kms_key(secrets_dir: Path) -> str:
    """The value of ``MINIO_KMS_SECRET_KEY`` (``<name>:<base64 of 32 bytes>``), generated once
    into ``<secrets_dir>/minio-kms.key`` (0600) and read back afterwards."""
    _private_folder(secrets_dir)
    path = secrets_dir / KMS_KEY_FILE
    if path.is_file():
        value = path.read_text(encoding="utf-8").strip()
        if not _KMS_KEY.fullmatch(value):
            # Never replace it: objects encrypted under the old key would be lost for good.
            raise ValueError(f"{path} does not hold a MinIO KMS key (<name>:<base64 32 bytes>)")
        return value
    value = f"{KMS_KEY_NAME}:{base64.b64encode(secrets.token_bytes(32)).decode()}"
    _write_private(path, f"{value}\n".encode())
    return value


def _private_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that already existed
