"""Creating the planned credentials in MinIO (admin API) and handing them to their processes.

Each principal's secret is generated once and kept in ``<folder>/<principal>.env`` (mode
0600) as the two ``SLUICEWAY_OBJECT_STORE__*`` variables its process needs; applying again
re-creates user and policy with the same secret, so a re-run changes nothing that works.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import urllib3
from minio.error import MinioAdminException

from pipeline.settings import ObjectStoreSettings
from pipeline.storage.client import make_admin
from pipeline.storage.exceptions import ObjectStoreError
from pipeline.storage.policies import Grant

ACCESS_KEY_VARIABLE = "SLUICEWAY_OBJECT_STORE__ACCESS_KEY"
SECRET_KEY_VARIABLE = "SLUICEWAY_OBJECT_STORE__SECRET_KEY"  # noqa: S105 (a variable name)
SECRET_BYTES = 30
"""40 URL-safe characters: MinIO takes secret keys of 8 to 40 characters."""


def credential_file(folder: Path, principal: str) -> Path:
    return folder / f"{principal}.env"


def read_credential(path: Path) -> tuple[str, str] | None:
    """``(access key, secret key)`` from a credential file, or ``None`` if there is none."""
    if not path.is_file():
        return None
    values = dict(
        line.split("=", 1) for line in path.read_text(encoding="utf-8").splitlines() if "=" in line
    )
    access, secret = values.get(ACCESS_KEY_VARIABLE), values.get(SECRET_KEY_VARIABLE)
    return (access, secret) if access and secret else None


def ensure_credential(folder: Path, principal: str) -> tuple[str, str]:
    """The principal's credential, generated and written (0600) on first use."""
    path = credential_file(folder, principal)
    existing = read_credential(path)
    if existing is not None and existing[0] == principal:
        return existing
    secret = secrets.token_urlsafe(SECRET_BYTES)
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(f"{ACCESS_KEY_VARIABLE}={principal}\n{SECRET_KEY_VARIABLE}={secret}\n")
    return principal, secret


def apply_grants(store: ObjectStoreSettings, grants: Sequence[Grant], folder: Path) -> list[Path]:
    """Create (or update) each grant's policy and user with ``store``'s admin credentials;
    return the credential files, one per principal."""
    admin = make_admin(store)
    written = []
    for grant in grants:
        access, secret = ensure_credential(folder, grant.principal)
        try:
            admin.policy_add(grant.principal, policy=grant.policy)
            admin.user_add(access, secret)
            # Replaces whatever was attached before: the user ends with exactly this policy.
            admin.policy_set(grant.principal, user=access)
        except (MinioAdminException, urllib3.exceptions.HTTPError) as exc:
            raise ObjectStoreError(
                f"granting {grant.principal} on {store.endpoint} failed: {exc}"
            ) from exc
        written.append(credential_file(folder, grant.principal))
    return written
