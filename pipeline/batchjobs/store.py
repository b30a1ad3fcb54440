"""Where a batch job lives in the object store, and the only code that reads or writes it.

One folder per job under ``<bucket>/<batch.prefix>/<job id>/``:

- ``manifest.json``: the ``BatchJob`` contract as JSON, rewritten as the job moves on;
- ``input.<format>``: the submitted file, copied so the job never depends on the original;
- ``results.jsonl`` / ``errors.jsonl``: one line per custom id, in input order;
- ``cancel.json``: present once someone asked to cancel the job.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.error import S3Error

from pipeline.settings import Settings
from pipeline.storage.client import ensure_bucket, make_client
from pipeline.storage.exceptions import ObjectStoreError
from schemas.errors import SluicewayError
from schemas.models import BatchJob, BatchJobStatus

FINAL_STATUSES = frozenset(
    {
        BatchJobStatus.COMPLETED,
        BatchJobStatus.FAILED,
        BatchJobStatus.CANCELLED,
        BatchJobStatus.EXPIRED,
    }
)
RESULTS_FILE = "results.jsonl"
ERRORS_FILE = "errors.jsonl"
_MANIFEST = "manifest.json"
_CANCEL = "cancel.json"
_READ_CHUNK = 1024 * 1024


class JobNotFoundError(SluicewayError):
    """No manifest for that job id."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise SluicewayError(f"not an s3://bucket/key URI: {uri!r}")
    bucket, key = uri[5:].split("/", 1)
    return bucket, key


class JobStore:
    def __init__(self, settings: Settings, client: Minio | None = None) -> None:
        self.bucket = settings.object_store.bucket
        self.prefix = settings.batch.prefix
        self._client = client or make_client(settings.object_store)

    def ensure_bucket(self) -> None:
        ensure_bucket(self._client, self.bucket)

    def key(self, job_id: str, name: str) -> str:
        return f"{self.prefix}/{job_id}/{name}"

    def uri(self, job_id: str, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(job_id, name)}"

    # -- manifests

    def save(self, job: BatchJob) -> BatchJob:
        job = job.model_copy(update={"manifest_uri": self.uri(job.job_id, _MANIFEST)})
        body = job.model_dump_json(indent=2).encode()
        self._put(self.key(job.job_id, _MANIFEST), body, "application/json")
        return job

    def load(self, job_id: str) -> BatchJob:
        body = self._get(self.key(job_id, _MANIFEST))
        if body is None:
            raise JobNotFoundError(f"no batch job {job_id!r} in s3://{self.bucket}")
        return BatchJob.model_validate_json(body)

    def list(self) -> list[BatchJob]:
        """Every job, newest first."""
        jobs = []
        for job_id in self._job_ids():
            try:
                jobs.append(self.load(job_id))
            except JobNotFoundError:
                continue  # a folder whose manifest is not written yet
        return sorted(jobs, key=lambda job: job.created_at, reverse=True)

    def _job_ids(self) -> Iterator[str]:
        try:
            for item in self._client.list_objects(self.bucket, prefix=f"{self.prefix}/"):
                name = str(item.object_name)
                if item.is_dir:
                    yield name[len(self.prefix) + 1 :].rstrip("/")
        except (S3Error, urllib3.exceptions.HTTPError) as exc:
            raise ObjectStoreError(f"listing batch jobs failed: {exc}") from exc

    # -- input and outputs

    def put_input(self, job_id: str, source: str | Path, name: str) -> str:
        """Copy the input (a local file or an object) into the job's folder; return its URI."""
        key = self.key(job_id, name)
        try:
            if isinstance(source, str) and source.startswith("s3://"):
                bucket, source_key = parse_s3_uri(source)
                self._client.copy_object(self.bucket, key, CopySource(bucket, source_key))
            else:
                self._client.fput_object(self.bucket, key, str(source))
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as exc:
            raise ObjectStoreError(f"storing the input of job {job_id} failed: {exc}") from exc
        return self.uri(job_id, name)

    def download(self, uri: str, destination: Path) -> Path:
        bucket, key = parse_s3_uri(uri)
        try:
            self._client.fget_object(bucket, key, str(destination))
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as exc:
            raise ObjectStoreError(f"reading {uri} failed: {exc}") from exc
        return destination

    def put_output(self, job_id: str, name: str, path: Path) -> str:
        try:
            self._client.fput_object(
                self.bucket, self.key(job_id, name), str(path), content_type="application/x-ndjson"
            )
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as exc:
            raise ObjectStoreError(f"writing {name} of job {job_id} failed: {exc}") from exc
        return self.uri(job_id, name)

    def stream(self, uri: str) -> Iterator[bytes]:
        """The object's bytes in chunks, never all in memory."""
        bucket, key = parse_s3_uri(uri)
        try:
            response = self._client.get_object(bucket, key)
        except (S3Error, urllib3.exceptions.HTTPError) as exc:
            raise ObjectStoreError(f"reading {uri} failed: {exc}") from exc
        try:
            yield from response.stream(_READ_CHUNK)
        finally:
            response.close()
            response.release_conn()

    # -- cancellation

    def request_cancel(self, job_id: str, reason: str) -> None:
        body = json.dumps({"requested_at_ms": int(time.time() * 1000), "reason": reason})
        self._put(self.key(job_id, _CANCEL), body.encode(), "application/json")

    def cancel_request(self, job_id: str) -> dict[str, Any] | None:
        body = self._get(self.key(job_id, _CANCEL))
        return None if body is None else dict(json.loads(body))

    # -- plumbing

    def _put(self, key: str, body: bytes, content_type: str) -> None:
        put_bytes(self._client, self.bucket, key, body, content_type)

    def _get(self, key: str) -> bytes | None:
        return get_bytes(self._client, self.bucket, key)


def put_bytes(client: Minio, bucket: str, key: str, body: bytes, content_type: str) -> None:
    try:
        client.put_object(bucket, key, io.BytesIO(body), len(body), content_type=content_type)
    except (S3Error, urllib3.exceptions.HTTPError) as exc:
        raise ObjectStoreError(f"writing s3://{bucket}/{key} failed: {exc}") from exc


def get_bytes(client: Minio, bucket: str, key: str) -> bytes | None:
    """The object's bytes, or None when there is no such object."""
    try:
        response = client.get_object(bucket, key)
    except S3Error as exc:
        if exc.code == "NoSuchKey":
            return None
        raise ObjectStoreError(f"reading s3://{bucket}/{key} failed: {exc}") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise ObjectStoreError(f"reading s3://{bucket}/{key} failed: {exc}") from exc
    try:
        return bytes(response.read())
    finally:
        response.close()
        response.release_conn()
