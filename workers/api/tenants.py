"""Who a request is (its bearer key's tenant) and what that tenant may still enqueue. Pure."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pipeline.batchjobs.lifecycle import is_final
from pipeline.settings import TenantSettings
from schemas.models import BatchJob
from workers.api.openai_format import ApiError

_MAX_HEADER = 4096


@dataclass(frozen=True)
class Tenant:
    name: str
    limits: TenantSettings


class KeyRing:
    """Bearer keys -> tenants, compared as SHA-256 digests in constant time."""

    def __init__(self, tenants: Mapping[str, TenantSettings]) -> None:
        self._entries = [
            (_digest(key.get_secret_value()), Tenant(name, limits))
            for name, limits in tenants.items()
            for key in limits.api_keys
        ]

    def tenant(self, authorization: str | None) -> Tenant:
        """The tenant of an ``Authorization: Bearer <key>`` header, or 401."""
        if not authorization:
            raise ApiError(
                401,
                "You didn't provide an API key (Authorization: Bearer <key>).",
                code="missing_api_key",
            )
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key or len(authorization) > _MAX_HEADER:
            raise ApiError(
                401, "The Authorization header must be 'Bearer <key>'.", code="invalid_api_key"
            )
        digest = _digest(key)
        found: Tenant | None = None
        for known, tenant in self._entries:
            # Every entry is compared, so the time taken does not tell which one matched.
            if hmac.compare_digest(known, digest):
                found = tenant
        if found is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def enqueued_records(jobs: Iterable[BatchJob]) -> int:
    """Records of unfinished jobs not answered yet."""
    return sum(
        max(job.counts.total - job.counts.completed - job.counts.failed, 0)
        for job in jobs
        if not is_final(job.status)
    )


def check_enqueued(tenant: Tenant, enqueued: int, adding: int) -> None:
    limit = tenant.limits.max_enqueued_records
    if enqueued + adding > limit:
        raise ApiError(
            429,
            f"Enqueued records limit reached for tenant {tenant.name}: {enqueued} enqueued, "
            f"this batch adds {adding}, the limit is {limit}. Try again once batches finish.",
            code="enqueued_records_limit_exceeded",
        )


def check_file_size(tenant: Tenant, size: int) -> None:
    limit = tenant.limits.max_file_bytes
    if size > limit:
        raise ApiError(
            429,
            f"File too large for tenant {tenant.name}: more than its limit of {limit} bytes.",
            code="file_size_limit_exceeded",
        )
