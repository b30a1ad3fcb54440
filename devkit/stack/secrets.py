"""The secured stack's secrets: generated once per state folder, kept under ``<state>/secrets``.

* ``ca.pem`` / ``ca-key.pem``: the stack's CA (:mod:`devkit.stack.tls`); ``kafka.pem`` and
  ``kafka-key.pem`` the broker's server certificate, ``clients/<principal>.pem`` client
  certificates for mTLS (CN = principal).
* ``kafka-users/<principal>``: each Kafka principal's SCRAM password
  (``secrets.token_urlsafe``), mode 0600. Printed only by ``sluiceway stack credentials``.
* ``oauth-issuer-key.pem`` and ``oauth-jwks.json``: the local token issuer
  (:mod:`devkit.stack.oauth`).

Every file is created with ``O_EXCL``: two processes racing to create a secret agree on the
first one written, and a secret, once handed out, never changes under its holder.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

from devkit.stack.exceptions import StackError
from devkit.stack.tls import Authority, KeyPair, ensure_authority
from pipeline.kafka.acls import PRINCIPAL_NAME
from pipeline.principals import ADMIN

SECRETS_FOLDER = "secrets"
PASSWORD_BYTES = 32


def secrets_dir(state_dir: Path) -> Path:
    return state_dir / SECRETS_FOLDER


def check_principal(principal: str) -> str:
    """Return ``principal`` if it is a name the stack can hold secrets for, else raise."""
    if not PRINCIPAL_NAME.fullmatch(principal):
        raise StackError(
            f"{principal!r} is not a principal name: letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return principal


def write_secret_once(path: Path, data: bytes) -> bytes:
    """Create ``path`` (mode 0600) holding ``data`` unless it exists; return what it holds."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_complete(path)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    return data


def _read_complete(path: Path, patience_s: float = 5.0) -> bytes:
    """A file another process just created may still be empty for a moment."""
    deadline = time.monotonic() + patience_s
    while True:
        data = path.read_bytes()
        if data or time.monotonic() > deadline:
            return data
        time.sleep(0.01)


class KafkaSecrets:
    """The CA, certificates and passwords the secured Kafka listener and its clients use."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = secrets_dir(state_dir)

    def authority(self) -> Authority:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(OSError):
            self.folder.chmod(0o700)
        return ensure_authority(self.folder)

    def server_pair(self) -> KeyPair:
        return self.authority().issue_server(self.folder, "kafka")

    def client_pair(self, principal: str) -> KeyPair:
        return self.authority().issue_client(self.folder / "clients", check_principal(principal))

    def password(self, principal: str) -> str:
        """The principal's SCRAM password, generated on first use."""
        path = self.folder / "kafka-users" / check_principal(principal)
        generated = secrets.token_urlsafe(PASSWORD_BYTES).encode("ascii")
        return write_secret_once(path, generated).decode("ascii").strip()

    def admin_password(self) -> str:
        return self.password(ADMIN)

    def keystore(self) -> Path:
        """The broker's PEM keystore: its private key followed by its certificate chain."""
        pair = self.server_pair()
        path = self.folder / "kafka-keystore.pem"
        chain = pair.key.read_bytes() + pair.certificate.read_bytes()
        chain += self.authority().certificate.read_bytes()
        write_secret_once(path, chain)
        return path
