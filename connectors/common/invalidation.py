"""Invalidations as Kafka messages: a deleted or cancelled source record, ready to produce.

A connector that learns a source record is gone (deleted) or no longer counts (cancelled)
publishes an :class:`~schemas.models.Invalidation` on ``<ns>.<model>.invalidations``
(compacted). The key is the entity key the connector gives the entity's requests, so the
compacted topic keeps the latest word per entity and readers can match it to the requests
and results they hold. The value and headers are those of every other contract event
(single-object Avro, ``content-type`` and ``sluiceway-schema``), so the same decoders and
dead-letter rules apply.
"""

from __future__ import annotations

import schemas
from schemas.models import Invalidation

InvalidationMessage = tuple[bytes, bytes, list[tuple[str, bytes]]]
"""``(key, value, headers)`` as ``Producer.produce`` takes them."""


def invalidation_message(invalidation: Invalidation) -> InvalidationMessage:
    """Key, value and headers of one invalidation (pure; raises ``EncodeError`` only if the
    event does not fit the contract's size limits)."""
    return (
        invalidation.entity_key.encode("utf-8"),
        schemas.encode(invalidation),
        schemas.message_headers(invalidation.AVRO_NAME),
    )
