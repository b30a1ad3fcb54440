"""Polling: OData delta reads in, requests out, the position checkpointed after their acks.

Each poll reads ``$filter=<delta_field> ge <position>`` pages in change order, publishes each
page's requests, and checkpoints the page's newest change time once they are acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import datetime

from connectors.common.dates import parse_datetime, to_iso_utc
from connectors.sap.core import (
    Route,
    SapCore,
    delta_stream,
    event_letter_key,
    malformed_letter_key,
    pause,
)
from connectors.sap.intake import TRANSIENT_FAILURES
from connectors.sap.odata import EntityRecord, delta_value, key_predicate
from connectors.sap.routing import route_subject
from connectors.sap.writeback import correlation_id
from schemas.errors import UnservableRecord
from schemas.identity import request_id_for
from schemas.models import InferenceRequest

log = logging.getLogger(__name__)


class DeltaPolling:
    """Every route's changes since its checkpointed position, published in change order."""

    def __init__(self, core: SapCore) -> None:
        self.core = core
        self.stats = core.stats

    async def poll_once(self) -> int:
        """Read every change since the checkpointed position; return how many were published.

        Each query starts from the position and is left after its first page that moves the
        position on; the next query starts from there. Following the server's next link
        instead would be unsafe: ``$skiptoken`` paging is positional in many services, and
        entities changed meanwhile (our own writebacks change them!) move to the end of the
        order, shifting unread ones in front of the token, never to be read. The next link
        is followed only while a page moves nothing on (a run of equal change times).
        """
        published = 0
        for route in self.core.routes:
            while True:
                advanced, count = await self._poll_from_position(route)
                published += count
                if not advanced:
                    break
        return published

    async def _poll_from_position(self, route: Route) -> tuple[bool, int]:
        core = self.core
        stream = delta_stream(route.source, route.name)
        stored = core.positions.get(stream)
        since = parse_datetime(stored) if stored else None
        published = 0
        async with contextlib.aclosing(route.odata.read_changes(since)) as pages:
            async for page in pages:
                requests: list[InferenceRequest] = []
                newest = since
                for record in page.records:
                    request, changed = await self._polled_request(route, record)
                    if changed is not None and (newest is None or changed > newest):
                        newest = changed
                    if request is not None and str(request.request_id) not in core.memory.published:
                        requests.append(request)
                # Step 1: publish the page's requests and wait for the broker's acks.
                await core.publish(requests)
                published += len(requests)
                self.stats.polled += len(page.records)
                if newest is not None and newest != since:
                    # Step 2: only now is the page's newest change time a safe position.
                    position = to_iso_utc(newest)
                    await asyncio.to_thread(core.checkpoints.save, stream, position)
                    core.positions[stream] = position
                    return True, published
        return False, published

    async def _polled_request(
        self, route: Route, record: EntityRecord
    ) -> tuple[InferenceRequest | None, datetime | None]:
        core = self.core
        payload = json.dumps(record.properties, default=str).encode()
        changed: datetime | None = None
        # Until the record's change is known, its letter is keyed by its content: polling
        # reads the newest change again on every poll (``ge`` the position).
        letter = malformed_letter_key(payload)
        try:
            try:
                changed = delta_value(record, route.source)
                predicate = key_predicate(route.source, record.properties)
            except KeyError as missing:
                raise UnservableRecord(
                    "missing_key", f"key field {missing.args[0]!r} is missing"
                ) from None
            except ValueError as invalid:
                raise UnservableRecord("invalid_field", str(invalid)) from None
            entity = route_subject(route.name, predicate)
            if await core.own_writes.is_own_change(entity, record):
                self.stats.own_changes += 1
                return None, changed
            event_id = f"{route.source.entity_set}{predicate}@{to_iso_utc(changed)}"
            request_id = request_id_for(route.mapping.source_system, event_id)
            letter = event_letter_key(str(request_id))
            request = route.mapping.to_request(
                record.properties,
                source_event_id=event_id,
                correlation_id=correlation_id(core.signer, entity, request_id),
            )
            if core.memory.is_cancelled(request):
                return None, changed
        except UnservableRecord as unservable:
            if core.memory.letter_written(letter):
                self.stats.polled_letters_repeated += 1
                return None, changed
            await core.dead_letter(route, payload, unservable, key=None, source_event=letter)
            core.memory.remember_letters([letter])
            return None, changed
        return request, changed

    async def run(self, interval_s: float, stop: asyncio.Event) -> None:
        """Poll every ``interval_s`` until ``stop``; a failed poll is retried by the next."""
        while not stop.is_set():
            try:
                await self.poll_once()
            except TRANSIENT_FAILURES as failure:
                log.warning('poll failed, next poll retries error="%s"', failure)
            await pause(stop, interval_s)
