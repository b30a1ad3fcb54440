"""The object store is a real MinIO: objects are written, listed, read by range and deleted."""

from __future__ import annotations

import io
import uuid

import pytest
from minio.error import S3Error

from pipeline.settings import Settings
from pipeline.storage.client import ensure_bucket, make_client


def test_put_get_list_range_and_delete_objects(settings: Settings) -> None:
    client = make_client(settings.object_store)
    bucket = f"proof-{uuid.uuid4().hex[:12]}"
    ensure_bucket(client, bucket)
    ensure_bucket(client, bucket)  # idempotent
    bodies = {f"segments/{i:03d}.jsonl": f'{{"n": {i}}}\n'.encode() * (i + 1) for i in range(5)}
    for key, body in bodies.items():
        client.put_object(bucket, key, io.BytesIO(body), len(body))

    listed = sorted(obj.object_name for obj in client.list_objects(bucket, prefix="segments/"))
    assert listed == sorted(bodies)

    response = client.get_object(bucket, "segments/004.jsonl")
    try:
        assert response.read() == bodies["segments/004.jsonl"]
    finally:
        response.close()
        response.release_conn()

    # A ranged GET returns exactly the requested record, as result events rely on.
    ranged = client.get_object(bucket, "segments/004.jsonl", offset=9, length=8)
    try:
        assert ranged.read() == b'{"n": 4}'
    finally:
        ranged.close()
        ranged.release_conn()

    for key in bodies:
        client.remove_object(bucket, key)
    assert list(client.list_objects(bucket, prefix="segments/")) == []
    with pytest.raises(S3Error) as missing:
        client.stat_object(bucket, "segments/000.jsonl")
    assert missing.value.code == "NoSuchKey"
    client.remove_bucket(bucket)
    assert not client.bucket_exists(bucket)
