"""Writing result segments from asyncio: the blocking MinIO client runs on a small thread pool."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor

import urllib3
from minio import Minio
from minio.error import S3Error

from pipeline.storage.exceptions import ObjectKeyRefused, ObjectStoreError
from pipeline.storage.segments import Segment


class SegmentStore:
    """Puts segments into one bucket; every failure becomes an :class:`ObjectStoreError`."""

    def __init__(self, client: Minio, bucket: str, threads: int = 4) -> None:
        self.bucket = bucket
        self._client = client
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="s3-put")

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    async def put(self, segment: Segment) -> str:
        """Write the segment (overwriting an identical retry) and return its ETag."""
        return await self.put_bytes(segment.key, segment.body, "application/x-ndjson")

    async def put_bytes(self, key: str, body: bytes, content_type: str) -> str:
        """Write one object and return its ETag."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._put, key, body, content_type)

    def _put(self, key: str, body: bytes, content_type: str) -> str:
        try:
            written = self._client.put_object(
                self.bucket, key, io.BytesIO(body), len(body), content_type=content_type
            )
        except S3Error as exc:
            transient = exc.response is None or exc.response.status >= 500
            raise ObjectStoreError(
                f"writing s3://{self.bucket}/{key} failed: {exc.code}", transient=transient
            ) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ObjectStoreError(
                f"writing s3://{self.bucket}/{key} failed: {exc}", transient=True
            ) from exc
        except ValueError as exc:  # the client refused the name or arguments before sending
            raise ObjectKeyRefused(
                f"writing s3://{self.bucket}/{key[:200]} refused: {exc}", transient=False
            ) from exc
        return str(written.etag)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
