"""What the SAP connector's pieces (intake, polling, writeback) share: the routes, what has
been handled, the counters, and the one way out to Kafka.

Every piece keeps its own loop; the facts that tie them together live here once:
- :class:`Memory`: which events were handled (a redelivery is a duplicate), which bodies were
  dead-lettered, which entities are cancelled, which results were written;
- :class:`OwnWrites`: the ETags our own writes left, so a change that is our score is not
  scored again (the writeback sets them, intake and polling ask);
- :class:`SapCore`: the above, with publishing and dead-lettering through
  :class:`~connectors.common.publishing.ConnectorPublisher` (the path the Salesforce
  connector uses too), counted in :class:`ConnectorStats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from hashlib import sha256
from typing import Any

from confluent_kafka import Producer

from connectors.common.checkpoint import CheckpointStore
from connectors.common.correlation import CorrelationSigner
from connectors.common.dead_letters import LetterPrivacy, letter_privacy, source_event_key
from connectors.common.dedupe import RecentKeys
from connectors.common.mapping import Mapping
from connectors.common.outcomes import OUTCOMES
from connectors.common.publishing import ConnectorPublisher
from connectors.sap.client import ODataClient
from connectors.sap.cloudevents import CloudEvent
from connectors.sap.odata import EntityRecord, EntitySource
from connectors.sap.routing import RouteRule
from connectors.sap.writeback import WritebackSpec
from pipeline.settings import Settings
from pipeline.topics import ModelTopics
from schemas.errors import UnservableRecord
from schemas.models import InferenceRequest, Invalidation

log = logging.getLogger(__name__)

MALFORMED_ROUTE = "(malformed)"
"""Where a delivery that is no CloudEvent is counted: it names no route."""


def delta_stream(source: EntitySource, route_name: str = "") -> str:
    """The polling position's checkpoint stream; per route once there are several systems
    (two systems have the same entity sets)."""
    return f"delta:{route_name or source.entity_set}"


def cancelled_key(source_system: str, model: str, entity_id: str) -> str:
    """How a cancelled entity is remembered: by the entity id its requests are keyed by."""
    return f"{source_system}|{model}|{entity_id}"


def event_letter_key(request_id: str) -> str:
    """The source-event key of an event's dead letter: its request id (``source`` and ``id``
    hashed with the source system), which the memory of handled events holds."""
    return source_event_key(f"event:{request_id}")


def malformed_letter_key(body: bytes) -> str:
    """The source-event key of a malformed body's dead letter: the body's digest (it has no
    trustworthy id, and a digest quotes nothing of it)."""
    return source_event_key(f"malformed:{sha256(body).hexdigest()}")


def remember_letters(
    keys: Iterable[str], handled: RecentKeys, malformed: RecentKeys
) -> tuple[int, int]:
    """Put the source-event keys read back from the DLQ into the memories they came from:
    an event's request id into ``handled``, a malformed body's key into ``malformed``; keys
    of other forms (another connector's) are left alone. Returns how many went to each."""
    events = bodies = 0
    for key in keys:
        if key.startswith("event:"):
            handled.add(key.removeprefix("event:"))
            events += 1
        elif key.startswith("malformed:"):
            malformed.add(key)
            bodies += 1
    return events, bodies


def event_key(event: CloudEvent) -> str:
    """The source event id of a CloudEvent: ``source`` and ``id`` together are its identity
    (``id`` is unique only per source; two systems may reuse one)."""
    return f"{event.source}#{event.id}"


@dataclass(frozen=True, kw_only=True)
class Route(RouteRule):
    """A route with what it needs at run time: its system's OData client, its topics."""

    odata: ODataClient
    topics: ModelTopics
    writeback_spec: WritebackSpec | None

    @property
    def label(self) -> str:
        """How the route is named in counts and logs."""
        return self.name or self.mapping.model


def build_route(
    namespace: str,
    mapping: Mapping,
    odata: ODataClient,
    *,
    name: str = "",
    system: str = "default",
    event_sources: tuple[str, ...] = (),
) -> Route:
    return Route(
        name=name,
        system=system,
        mapping=mapping,
        source=odata.source,
        event_sources=event_sources,
        odata=odata,
        topics=ModelTopics(namespace, mapping.model),
        writeback_spec=WritebackSpec.from_mapping(mapping.writeback) if mapping.writeback else None,
    )


@dataclass
class ConnectorStats:
    events: int = 0
    published: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    polled: int = 0
    polled_letters_repeated: int = 0
    """Unmappable polled records not dead-lettered again: their letter was written already
    (polling reads its newest change again on every poll)."""
    written: int = 0
    already_written: int = 0
    skipped: int = 0
    write_failures: int = 0
    own_changes: int = 0
    auth_failures: int = 0
    """Deliveries refused 401 (reasons in the log and in ``WebhookGuard.refusals``)."""
    rate_limited: int = 0
    """Deliveries refused 429."""
    too_many_events: int = 0
    """Deliveries refused 413 for carrying more events than allowed."""
    forged: int = 0
    """Results claiming to be this connector's without its valid signature for their request."""
    invalidations: int = 0
    """Invalidations published (cancelled or deleted entities)."""
    malformed: int = 0
    """Deliveries that were no CloudEvent (each dead-lettered once)."""
    remembered_events: int = 0
    """Keys in the memory of handled events (bounded)."""
    forgotten_events: int = 0
    """Keys that memory dropped for its bound (a redelivery after that is looked up again)."""
    remembered_writes: int = 0
    forgotten_writes: int = 0
    cancelled_entities: int = 0
    """Entities remembered as cancelled (bounded): a later create/change of them is skipped."""
    skips: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Results not written back, by reason."""
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    """Input events by outcome; they sum to the events received."""
    skipped_events: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Skipped input events by reason (``unmapped_type``, ``cancelled``, ``own_change``)."""
    outcomes_by_route: dict[str, dict[str, int]] = field(default_factory=dict)

    def count_outcome(self, route: str, outcome: str) -> None:
        self.outcomes[outcome] += 1
        by_route = self.outcomes_by_route.setdefault(route, dict.fromkeys(OUTCOMES, 0))
        by_route[outcome] += 1

    def counters(self) -> dict[str, Any]:
        """Everything as plain JSON: the counters, outcomes and reasons."""
        flat: dict[str, Any] = {k: v for k, v in vars(self).items() if isinstance(v, int)}
        flat["outcomes"] = dict(self.outcomes)
        flat["outcomes_by_route"] = {k: dict(v) for k, v in self.outcomes_by_route.items()}
        flat["skipped_events"] = dict(self.skipped_events)
        flat["skips"] = dict(self.skips)
        return flat

    def outcome_table(self) -> str:
        """Input events by route and outcome, with a total row that sums to ``events``."""
        width = max([len("route"), len("total"), *map(len, self.outcomes_by_route)])
        head = f"{'route':<{width}} " + " ".join(f"{o:>12}" for o in OUTCOMES) + f" {'events':>8}"
        lines = [head]
        rows = [*sorted(self.outcomes_by_route.items()), ("total", self.outcomes)]
        for route, counts in rows:
            cells = " ".join(f"{counts.get(o, 0):>12}" for o in OUTCOMES)
            lines.append(f"{route:<{width}} {cells} {sum(counts.values()):>8}")
        return "\n".join(lines)


@dataclass
class Memory:
    """What the connector remembers (each memory bounded in keys and age)."""

    published: RecentKeys
    """Request ids (the event keys) of events handled: published, invalidated,
    dead-lettered or skipped as cancelled."""
    malformed: RecentKeys
    """Keys (:func:`malformed_letter_key`) of malformed bodies already dead-lettered."""
    cancelled: RecentKeys
    """:func:`cancelled_key` of entities cancelled: a later create/change is skipped."""
    written: RecentKeys
    """Request ids of results written back."""

    @classmethod
    def bounded(
        cls, max_keys: int, max_age_s: float, clock: Callable[[], float] | None = None
    ) -> Memory:
        options: dict[str, Any] = {"max_keys": max_keys, "max_age_s": max(max_age_s, 1.0)}
        if clock is not None:
            options["clock"] = clock
        return cls(
            published=RecentKeys(**options, name="published"),
            malformed=RecentKeys(**options, name="malformed"),
            cancelled=RecentKeys(**options, name="cancelled"),
            written=RecentKeys(**options, name="written"),
        )

    def is_cancelled(self, request: InferenceRequest) -> bool:
        if request.source is None:
            return False
        return (
            cancelled_key(request.source.system, request.model, request.source.entity_id)
            in self.cancelled
        )

    def letter_written(self, key: str) -> bool:
        """Whether the letter of source-event ``key`` was written (by this run, or before a
        restart as the DLQ's headers said): an event's by its request id, else by digest."""
        if key.startswith("event:"):
            return key.removeprefix("event:") in self.published
        return key in self.malformed

    def remember_letters(self, keys: Iterable[str]) -> tuple[int, int]:
        return remember_letters(keys, self.published, self.malformed)


@dataclass
class OwnWrites:
    """The ETags our own writeback left on entities (``route_subject`` -> ETag), and the
    writes under way: a change that is our score is not news to score again (else every
    writeback would come back as a change)."""

    etags: dict[str, str] = field(default_factory=dict)
    writing: dict[str, asyncio.Event] = field(default_factory=dict)

    async def is_own_change(self, entity: str, record: EntityRecord) -> bool:
        """Whether the entity is as our own writeback left it. A read that raced a write of
        ours waits for the write's answer: the entity may already show the write's ETag
        before the connector has learnt it."""
        running = self.writing.get(entity)
        if running is not None:
            await running.wait()
        return record.etag is not None and self.etags.get(entity) == record.etag


class SapCore:
    """The routes and the shared state of one connector, and its way out to Kafka.

    ``publisher`` is made by :meth:`open` unless given; ``letter_producer`` (default: the
    publisher's) is where dead letters go.
    """

    def __init__(
        self,
        settings: Settings,
        routes: Sequence[Route],
        *,
        name: str,
        signer: CorrelationSigner,
        memory: Memory,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        letter_producer: Producer | None = None,
    ) -> None:
        if not routes:
            raise ValueError("a connector needs at least one route")
        names = [route.name for route in routes]
        if len(set(names)) != len(names):
            raise ValueError(f"route names repeat: {names}")
        self.settings = settings
        self.routes = list(routes)
        self.routes_by_name = {route.name: route for route in routes}
        self.name = name
        self.signer = signer
        self.memory = memory
        self.own_writes = OwnWrites()
        self.stats = ConnectorStats()
        self.clock = clock
        self.checkpoints = CheckpointStore(settings, name)
        self.positions: dict[str, str] = {}
        # Refuses a model with a pii policy whose letters would keep raw payloads, as its worker.
        self.letter_privacy: dict[str, LetterPrivacy] = {
            route.mapping.model: letter_privacy(settings, route.mapping.model) for route in routes
        }
        self.publisher: ConnectorPublisher | None = None
        self._letter_producer = letter_producer

    @property
    def first(self) -> Route:
        """The route that stands for the connector where one is needed: malformed deliveries
        (which name no route) are dead-lettered to its model."""
        return self.routes[0]

    def models(self) -> dict[str, ModelTopics]:
        return {route.mapping.model: route.topics for route in self.routes}

    def open(self) -> None:
        """Make the publisher, unless there is one (its request producer is made at first
        use, so a connector that has only dead-lettered holds none)."""
        if self.publisher is None:
            self.publisher = ConnectorPublisher(
                self.settings, self.name, letters=self._letter_producer
            )

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        self.checkpoints.close()

    def _publisher(self) -> ConnectorPublisher:
        self.open()
        assert self.publisher is not None
        return self.publisher

    def count_memory(self) -> None:
        memory, stats = self.memory, self.stats
        stats.remembered_events = len(memory.published)
        stats.forgotten_events = memory.published.evicted + memory.malformed.evicted
        stats.remembered_writes = len(memory.written)
        stats.forgotten_writes = memory.written.evicted
        stats.cancelled_entities = len(memory.cancelled)

    async def publish(self, requests: Sequence[InferenceRequest]) -> None:
        """Publish requests and wait for the broker's acks; then they count as handled."""
        if not requests:
            return
        await asyncio.to_thread(self._publisher().requests, requests)
        for request in requests:
            self.memory.published.add(str(request.request_id))
        self.stats.published += len(requests)

    async def invalidate(self, invalidation: Invalidation) -> None:
        """Publish one invalidation and wait for the broker's ack."""
        await asyncio.to_thread(self._publisher().invalidations, [invalidation])
        self.stats.invalidations += 1

    async def dead_letter(
        self,
        route: Route,
        payload: bytes,
        why: UnservableRecord,
        *,
        key: str | None,
        request_id: str | None = None,
        headers: dict[str, str] | None = None,
        source_event: str | None = None,
    ) -> None:
        """Write a letter to the route's model's DLQ and wait for its ack."""
        letter = await asyncio.to_thread(
            lambda: self._publisher().dead_letter(
                model=route.mapping.model,
                payload=payload,
                why=why,
                source_system=route.mapping.source_system,
                privacy=self.letter_privacy[route.mapping.model],
                source_key=key,
                source_headers=headers,
                request_id=request_id,
                source_event=source_event,
            )
        )
        # The letter's text, not the reason's: for a model with a pii policy it quotes no value.
        log.warning(
            'dead-lettered reason="%s" key="%s" message="%s"',
            why.reason_code,
            key,
            letter.reason_message,
        )
        self.stats.dead_lettered += 1


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``, or less when ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
