"""The API's objects in the object store, one folder per tenant under ``<api.prefix>/``:

- ``<tenant>/files/<file id>/content.jsonl`` and ``meta.json``: an uploaded file;
- ``<tenant>/idempotency/<sha256 of the key>.json``: the batch an Idempotency-Key created;
- ``<tenant>/usage/<job id>.json``: a finished batch's token usage, summed once.

Batches themselves are ordinary batch jobs (:class:`JobStore`), tagged with their tenant.
Callers pass ids already checked by :mod:`workers.api.openai_format`, and tenant names come
from the settings, so every key below stays inside its tenant's folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from pipeline.batchjobs.store import JobStore, get_bytes, put_bytes
from pipeline.settings import Settings
from pipeline.storage.client import make_client
from pipeline.storage.exceptions import ObjectStoreError

_CONTENT = "content.jsonl"
_META = "meta.json"


class ApiStore:
    def __init__(self, settings: Settings, client: Minio | None = None) -> None:
        self.bucket = settings.object_store.bucket
        self.prefix = settings.api.prefix
        self.max_files_listed = settings.api.max_files_listed
        self.client = client or make_client(settings.object_store)
        self.jobs = JobStore(settings, self.client)

    def _key(self, tenant: str, *parts: str) -> str:
        return "/".join((self.prefix, tenant, *parts))

    # -- uploaded files

    def save_file(self, tenant: str, meta: dict[str, Any], content: Path) -> None:
        file_id = str(meta["id"])
        try:
            self.client.fput_object(
                self.bucket,
                self._key(tenant, "files", file_id, _CONTENT),
                str(content),
                content_type="application/x-ndjson",
            )
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as exc:
            raise ObjectStoreError(f"storing file {file_id} failed: {exc}") from exc
        # The meta object last: a file is listed only once its content is whole.
        self._put_json(self._key(tenant, "files", file_id, _META), meta)

    def file_meta(self, tenant: str, file_id: str) -> dict[str, Any] | None:
        return self._get_json(self._key(tenant, "files", file_id, _META))

    def file_uri(self, tenant: str, file_id: str) -> str:
        return f"s3://{self.bucket}/{self._key(tenant, 'files', file_id, _CONTENT)}"

    def files(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's files, newest first (the first ``api.max_files_listed`` read)."""
        found: list[dict[str, Any]] = []
        for file_id in self._folders(self._key(tenant, "files") + "/"):
            meta = self.file_meta(tenant, file_id)
            if meta is not None:
                found.append(meta)
            if len(found) >= self.max_files_listed:
                break
        return sorted(found, key=lambda meta: (meta["created_at"], meta["id"]), reverse=True)

    def delete_file(self, tenant: str, file_id: str) -> None:
        names = [
            DeleteObject(self._key(tenant, "files", file_id, name)) for name in (_META, _CONTENT)
        ]
        try:
            failures = list(self.client.remove_objects(self.bucket, names))
        except (S3Error, urllib3.exceptions.HTTPError) as exc:
            raise ObjectStoreError(f"deleting file {file_id} failed: {exc}") from exc
        if failures:
            raise ObjectStoreError(f"deleting file {file_id} failed: {failures[0]}")

    def object_size(self, uri: str) -> int:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        try:
            return int(self.client.stat_object(bucket, key).size or 0)
        except (S3Error, urllib3.exceptions.HTTPError) as exc:
            raise ObjectStoreError(f"reading {uri} failed: {exc}") from exc

    # -- idempotency records and usage

    def idempotent_batch(self, tenant: str, key_digest: str) -> dict[str, Any] | None:
        return self._get_json(self._key(tenant, "idempotency", f"{key_digest}.json"))

    def remember_idempotent_batch(
        self, tenant: str, key_digest: str, record: dict[str, Any]
    ) -> None:
        self._put_json(self._key(tenant, "idempotency", f"{key_digest}.json"), record)

    def usage(self, tenant: str, job_id: str) -> dict[str, int] | None:
        found = self._get_json(self._key(tenant, "usage", f"{job_id}.json"))
        return None if found is None else {name: int(value) for name, value in found.items()}

    def remember_usage(self, tenant: str, job_id: str, usage: dict[str, int]) -> None:
        self._put_json(self._key(tenant, "usage", f"{job_id}.json"), dict(usage))

    # -- plumbing

    def _put_json(self, key: str, value: dict[str, Any]) -> None:
        put_bytes(self.client, self.bucket, key, json.dumps(value).encode(), "application/json")

    def _get_json(self, key: str) -> dict[str, Any] | None:
        body = get_bytes(self.client, self.bucket, key)
        return None if body is None else dict(json.loads(body))

    def _folders(self, prefix: str) -> Iterator[str]:
        try:
            for item in self.client.list_objects(self.bucket, prefix=prefix):
                if item.is_dir:
                    yield str(item.object_name)[len(prefix) :].rstrip("/")
        except (S3Error, urllib3.exceptions.HTTPError) as exc:
            raise ObjectStoreError(f"listing {prefix} failed: {exc}") from exc
