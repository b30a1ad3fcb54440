"""Writeback: this connector's results in, OData writes out, offsets committed after them.

It consumes ``<ns>.<model>.results`` in the connector's own consumer group, picks the results
whose correlation id this connector signed for their request id (anything else that claims to
be this connector's is counted as ``forged``, logged and never written), and writes each back
(read the entity for its ETag, skip it if its marker field already holds the request id,
PATCH/MERGE with ``If-Match``, or call the configured action; :mod:`connectors.sap.writeback`
plans each call). Offsets are committed only after every result up to them was written (or
dead-lettered as permanently unwritable).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from confluent_kafka import Consumer, Message, TopicPartition

import schemas
from connectors.common.correlation import Rejected
from connectors.sap.core import Route, SapCore, pause
from connectors.sap.exceptions import EntityNotFound, ODataError, PreconditionFailed
from connectors.sap.routing import route_subject
from connectors.sap.writeback import Skip, WritebackCall, entity_of, plan_writeback
from pipeline.kafka import clients
from pipeline.kafka.clients import ConsumerRole
from pipeline.kafka.events import decode_records
from pipeline.resilience.retry import RetryPolicy
from schemas.errors import UnservableRecord
from schemas.models import InferenceResult

log = logging.getLogger(__name__)

PERMANENT_WRITE_STATUSES = frozenset({400, 404, 405, 409, 410, 422, 428})
"""Answers that no retry changes (the entity is gone, the field is not updatable): the result
is dead-lettered and its offset committed. Anything else (401/403 after a credential change,
5xx, timeouts) holds the partition and is retried, so no score is skipped."""
WRITE_CONFLICT_ATTEMPTS = 3
"""A 412 means the entity changed between our read and our write: read again, this often."""


class WritebackLoop:
    """Results in, writes out; ``retry`` paces a result whose write failed transiently (its
    waits double, without jitter: one entity's results are written in order)."""

    def __init__(self, core: SapCore, *, retry: RetryPolicy, concurrency: int = 8) -> None:
        self.core = core
        self.stats = core.stats
        self.retry = retry
        self._slots = asyncio.Semaphore(concurrency)
        self._batch_done = False

    @property
    def group(self) -> str:
        """The writeback's consumer group (group ids are cluster-wide: namespaced)."""
        return f"{self.core.settings.namespace}.connector.{self.core.name}.writeback"

    async def run(self, stop: asyncio.Event, poll_s: float = 0.5) -> None:
        """Write results back until ``stop``; commit offsets only after their writes."""
        results_topics = sorted(
            {r.topics.results for r in self.core.routes if r.writeback_spec is not None}
        )
        if not results_topics:
            return
        consumer = clients.consumer(
            self.core.settings.kafka,
            group_id=self.group,
            role=ConsumerRole.COMMITTED,
            overrides={
                # Static membership: a restarted connector takes its partitions back at once
                # instead of waiting out the dead member's session.
                "group.instance.id": f"{self.group}.0",
                "session.timeout.ms": 10_000,
            },
        )
        consumer.subscribe(results_topics)
        try:
            while not stop.is_set():
                messages = await asyncio.to_thread(consumer.consume, 200, poll_s)
                records = [m for m in messages if m.error() is None]
                if not records:
                    continue
                await self._write_batch(records, stop)
                if stop.is_set() and not self._batch_done:
                    return  # stopped mid-batch: commit nothing, the next run redoes it
                await asyncio.to_thread(_commit, consumer, records)
        finally:
            await asyncio.to_thread(consumer.close)

    async def _write_batch(self, messages: list[Message], stop: asyncio.Event) -> None:
        # One entity's results in offset order (an older score never overwrites a newer one);
        # different entities in parallel.
        by_entity: dict[tuple[str, str], list[InferenceResult]] = defaultdict(list)
        for result in decode_records(messages, InferenceResult):
            named = entity_of(self.core.signer, result)
            if isinstance(named, Rejected):
                if named.reason != "not_ours":
                    self._count_forged(result, named.reason)
                continue
            by_entity[named].append(result)
        self._batch_done = False

        async def write_entity(named: tuple[str, str], results: list[InferenceResult]) -> None:
            route = self.core.routes_by_name.get(named[0])
            if route is None or route.writeback_spec is None:
                # Signed by us for a route this configuration no longer has: nowhere to write.
                self.stats.skipped += len(results)
                self.stats.skips["unknown_route"] += len(results)
                log.warning('writeback skipped: no route "%s" any more', named[0])
                return
            for result in results:
                await self._write_until_done(route, named[1], result, stop)

        await asyncio.gather(*(write_entity(n, rs) for n, rs in by_entity.items()))
        self.core.count_memory()
        self._batch_done = not stop.is_set()

    def _count_forged(self, result: InferenceResult, reason: str) -> None:
        # One line, no feature values or scores: the request id lets an operator find the
        # request, the reason says what was wrong with its correlation id.
        self.stats.forged += 1
        log.warning(
            'writeback refused: result not signed for its request reason="%s" request_id="%s" '
            'model="%s"',
            reason,
            result.request_id,
            result.model,
        )

    async def _write_until_done(
        self, route: Route, predicate: str, result: InferenceResult, stop: asyncio.Event
    ) -> None:
        """Write one result; failures are retried (the partition waits) until it is written,
        dead-lettered as permanently unwritable, or the connector stops. A failure that
        outlasts the retry budget is raised: it stops the connector."""
        loop = asyncio.get_running_loop()
        started, attempts = loop.time(), 0
        while not stop.is_set():
            try:
                async with self._slots:
                    await self.write_result(predicate, result, route)
                return
            except ODataError as failure:
                if failure.status in PERMANENT_WRITE_STATUSES:
                    self.stats.write_failures += 1
                    why = UnservableRecord(f"writeback_failed_{failure.status}", str(failure))
                    await self.core.dead_letter(
                        route,
                        schemas.encode(result),
                        why,
                        key=predicate,
                        request_id=str(result.request_id),
                    )
                    return
                attempts += 1
                out_of_budget = attempts >= self.retry.max_attempts
                if out_of_budget or loop.time() - started >= self.retry.max_elapsed_s:
                    raise
                log.warning('writeback retried later error="%s"', failure)
            await pause(stop, self.retry.backoff_cap(attempts))

    async def write_result(
        self, predicate: str, result: InferenceResult, route: Route | None = None
    ) -> None:
        """Write one result back once: duplicates (same request id) are skipped."""
        route = route or self.core.first
        assert route.writeback_spec is not None
        written = self.core.memory.written
        request_id = str(result.request_id)
        if request_id in written:
            self.stats.already_written += 1
            return
        plan = plan_writeback(
            result, predicate=predicate, source=route.source, spec=route.writeback_spec
        )
        if isinstance(plan, Skip):
            self.stats.skipped += 1
            self.stats.skips[plan.reason] += 1
            return
        if plan.method == "POST":
            await route.odata.write(plan, None)
        elif not await self._update_entity(route, predicate, plan):
            written.add(request_id)
            self.stats.already_written += 1
            return
        written.add(request_id)
        self.stats.written += 1

    async def _update_entity(self, route: Route, predicate: str, plan: WritebackCall) -> bool:
        """PATCH/MERGE with the entity's current ETag; ``False`` when the marker shows it was
        already written (by a run that stopped before committing its offset)."""
        own = self.core.own_writes
        for attempt in range(1, WRITE_CONFLICT_ATTEMPTS + 1):
            try:
                record = await route.odata.read_entity(predicate)
            except EntityNotFound as gone:
                raise ODataError(str(gone), status=404) from None
            if plan.marker is not None:
                name, value = plan.marker
                if str(record.properties.get(name) or "") == value:
                    return False
            entity = route_subject(route.name, predicate)
            writing = own.writing[entity] = asyncio.Event()
            try:
                response = await route.odata.write(plan, record.etag)
                etag = response.headers.get("etag")
                if etag:
                    own.etags[entity] = etag
            except PreconditionFailed:
                if attempt == WRITE_CONFLICT_ATTEMPTS:
                    raise ODataError(
                        f"{plan.path}: the entity kept changing (412 x{attempt})",
                        status=412,
                        transient=True,
                    ) from None
                continue
            finally:
                writing.set()
                del own.writing[entity]
            return True
        return True  # unreachable: the last attempt returns or raises


def _commit(consumer: Consumer, messages: list[Message]) -> None:
    ends: dict[tuple[str, int], int] = {}
    for message in messages:
        place = (str(message.topic()), int(message.partition() or 0))
        ends[place] = max(ends.get(place, -1), int(message.offset() or 0) + 1)
    consumer.commit(
        offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()], asynchronous=False
    )
