"""Who a request is, and where it is keyed: rules every publisher follows the same way.

A request derived from a source event gets the same id each time the event is delivered, so a
redelivery is the same request (deduplicated downstream); and one business entity's requests
share a message key, so they stay in order on one partition.
"""

from __future__ import annotations

import uuid

from schemas.models import InferenceRequest


def request_id_for(source_system: str, source_event_id: str) -> uuid.UUID:
    """A request id derived from the source event, so a redelivered event is the same request."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"sluiceway:{source_system}:{source_event_id}")


def message_key(request: InferenceRequest) -> str:
    """The Kafka key of a request: its business entity (one entity's requests stay in order on
    one partition), else its own id."""
    return request.source.entity_id if request.source else str(request.request_id)
