"""Building the S3 client and making sure the results bucket exists."""

from __future__ import annotations

import urllib3
from minio import Minio
from minio.error import MinioException

from pipeline.settings import ObjectStoreSettings
from pipeline.storage.exceptions import ObjectStoreError


def make_client(store: ObjectStoreSettings) -> Minio:
    return Minio(
        store.endpoint,
        access_key=store.access_key,
        secret_key=store.secret_key.get_secret_value(),
        secure=store.secure,
        region=store.region,
    )


def ensure_bucket(client: Minio, bucket: str) -> None:
    try:
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    except (MinioException, urllib3.exceptions.HTTPError) as exc:
        raise ObjectStoreError(f"cannot create or read bucket {bucket!r}: {exc}") from exc
