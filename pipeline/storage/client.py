"""Building the S3 client and making sure the results bucket exists.

:func:`make_client` is the one place a product process gets its MinIO client (worker sink,
batch jobs, monitor, CLI, demo), so TLS and trust settings cannot be forgotten by one of them.
"""

from __future__ import annotations

import os

import certifi
import urllib3
from minio import Minio
from minio.credentials.providers import StaticProvider
from minio.error import MinioException
from minio.minioadmin import MinioAdmin
from minio.sseconfig import Rule, SSEConfig

from pipeline.settings import ObjectStoreSettings
from pipeline.storage.exceptions import ObjectStoreError

# minio-py's own defaults (5 minutes, 10 connections, retry 5xx), which passing a pool replaces.
_TIMEOUT_S = 300.0
_POOL_SIZE = 10


def http_pool(store: ObjectStoreSettings) -> urllib3.PoolManager:
    """The HTTP pool behind every client of ``store``: it trusts ``store.ca_location`` when
    set, else ``SSL_CERT_FILE`` or certifi's bundle, as minio-py would; certificates are always
    verified."""
    if store.ca_location is not None:
        ca_certs = str(store.ca_location)
    else:
        ca_certs = os.environ.get("SSL_CERT_FILE") or certifi.where()
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=_TIMEOUT_S, read=_TIMEOUT_S),
        maxsize=_POOL_SIZE,
        cert_reqs="CERT_REQUIRED",
        ca_certs=ca_certs,
        retries=urllib3.Retry(total=5, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )


def make_client(store: ObjectStoreSettings) -> Minio:
    return Minio(
        store.endpoint,
        access_key=store.access_key,
        secret_key=store.secret_key.get_secret_value(),
        secure=store.secure,
        region=store.region,
        http_client=http_pool(store),
    )


def make_admin(store: ObjectStoreSettings) -> MinioAdmin:
    """MinIO's admin API with the same endpoint, trust and (root) credentials."""
    credentials = StaticProvider(store.access_key, store.secret_key.get_secret_value())
    return MinioAdmin(
        endpoint=store.endpoint,
        credentials=credentials,
        region=store.region,
        secure=store.secure,
        http_client=http_pool(store),
    )


def ensure_bucket(client: Minio, bucket: str) -> None:
    try:
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    except (MinioException, urllib3.exceptions.HTTPError) as exc:
        raise ObjectStoreError(f"cannot create or read bucket {bucket!r}: {exc}") from exc


def ensure_encrypted_bucket(client: Minio, bucket: str) -> None:
    """Create ``bucket`` if missing and make server-side encryption (SSE-S3, keys from the
    server's KMS) its default, so every object written later is encrypted at rest whatever the
    writer sends: no client can forget it."""
    ensure_bucket(client, bucket)
    try:
        client.set_bucket_encryption(bucket, SSEConfig(Rule.new_sse_s3_rule()))
    except (MinioException, urllib3.exceptions.HTTPError) as exc:
        raise ObjectStoreError(f"cannot turn on encryption of bucket {bucket!r}: {exc}") from exc
