"""Idempotent create: a retried ``POST /v1/batches`` with the same ``Idempotency-Key`` gets the
batch the first attempt made. Pure: what a key is stored under, and what counts as "the same
request" (the same key with other parameters is refused, not silently answered)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from workers.api.openai_format import ApiError

MAX_KEY_LENGTH = 255


def key_digest(key: str) -> str:
    """The name a key is stored under: a digest, so no key can shape an object name."""
    if not key or len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise ApiError(
            400,
            f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable ASCII characters.",
            param="Idempotency-Key",
        )
    return hashlib.sha256(key.encode()).hexdigest()


def fingerprint(request: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def replayed_batch(remembered: Mapping[str, Any] | None, request_fingerprint: str) -> str | None:
    """The batch id a remembered key names, ``None`` for a new key; 400 when the key was used
    for a different request."""
    if remembered is None:
        return None
    if remembered.get("fingerprint") != request_fingerprint:
        raise ApiError(
            400,
            "This Idempotency-Key was used with different parameters.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return str(remembered["batch_id"])
