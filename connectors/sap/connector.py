"""The running SAP connector: events or polling in, requests to Kafka, scores written back.

Three pieces, shaped like the Salesforce connector's loops, over one shared core
(:mod:`connectors.sap.core`: routes, memories, counters, and the one publishing path,
:class:`~connectors.common.publishing.ConnectorPublisher`):

- intake (:mod:`connectors.sap.intake`, behind the webhook :mod:`connectors.sap.receiver`):
  each pushed CloudEvent becomes a request, an invalidation, a dead letter, a duplicate or a
  skip, and is answered 2xx only once that outcome is acknowledged (503 when something
  transient failed, so SAP delivers it again);
- polling (:mod:`connectors.sap.polling`): OData delta reads, published page by page, the
  position checkpointed after the acks;
- writeback (:mod:`connectors.sap.writeback_loop`): this connector's signed results written
  back over OData, offsets committed after the writes.

Every input event ends in exactly one outcome (:data:`~connectors.sap.core.OUTCOMES`), counted
in ``ConnectorStats.outcomes`` (``/healthz`` and the connector's summary). At start the
connector reads back what it published, invalidated and dead-lettered within the dedupe
window (:mod:`connectors.sap.history`), so a redelivery after a restart is a duplicate.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from confluent_kafka import Producer

from connectors.common.mapping import Mapping
from connectors.sap.client import ODataClient
from connectors.sap.core import ConnectorStats, Memory, Route, SapCore, build_route
from connectors.sap.history import (
    dead_lettered_events,
    invalidated_events,
    published_request_ids,
)
from connectors.sap.intake import EventIntake
from connectors.sap.polling import DeltaPolling
from connectors.sap.receiver import web_app
from connectors.sap.systems import SapRetries
from connectors.sap.webhook import WebhookGuard, WebhookSecurity, check_listen
from connectors.sap.writeback import signer
from connectors.sap.writeback_loop import WritebackLoop
from pipeline.kafka.admin import ensure_topics, invalidation_topic_spec, model_topic_specs
from pipeline.settings import Settings

log = logging.getLogger(__name__)


class SapConnector:
    """One connector: its routes (mappings over systems) and its three pieces; build it,
    ``await start()``, then :func:`serve` it. ``SapConnector(settings, mapping, odata)`` is
    the one-route form."""

    def __init__(
        self,
        settings: Settings,
        mapping: Mapping | None = None,
        odata: ODataClient | None = None,
        *,
        routes: list[Route] | None = None,
        secrets: tuple[bytes, ...],
        name: str = "sap",
        dedupe_window: timedelta = timedelta(days=1),
        writeback_concurrency: int = 8,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        memory_keys: int = 200_000,
        monotonic: Callable[[], float] | None = None,
        letter_producer: Producer | None = None,
        retries: SapRetries | None = None,
    ) -> None:
        if routes is None:
            if mapping is None or odata is None:
                raise ValueError("a mapping and its OData client, or routes")
            routes = [build_route(settings.namespace, mapping, odata)]
        self.core = SapCore(
            settings,
            routes,
            name=name,
            signer=signer(name, secrets),
            memory=Memory.bounded(memory_keys, dedupe_window.total_seconds(), monotonic),
            clock=clock,
            letter_producer=letter_producer,
        )
        self.settings = settings
        self.name = name
        self.routes = self.core.routes
        self.stats = self.core.stats
        self._dedupe_window = dedupe_window
        self.intake = EventIntake(self.core)
        self.polling = DeltaPolling(self.core)
        self.writeback = WritebackLoop(
            self.core,
            retry=(retries or SapRetries()).writeback.policy(),
            concurrency=writeback_concurrency,
        )

    async def start(self) -> None:
        """Create topics, load checkpoints, and learn which events are already handled."""
        core, settings = self.core, self.settings
        for topics in core.models().values():
            await asyncio.to_thread(ensure_topics, settings.kafka, model_topic_specs(topics))
            await asyncio.to_thread(
                ensure_topics, settings.kafka, [invalidation_topic_spec(topics)]
            )
        core.positions = await asyncio.to_thread(core.checkpoints.load)
        self.intake.started()
        since = core.clock() - self._dedupe_window
        known = 0
        for model, topics in core.models().items():
            systems = {r.mapping.source_system for r in self.routes if r.mapping.model == model}
            handled = await asyncio.to_thread(
                published_request_ids, settings, topics.requests, systems, since
            )
            invalidated, cancelled = await asyncio.to_thread(
                invalidated_events, settings, topics.invalidations, self.name, since
            )
            for request_id in sorted(handled | invalidated):
                core.memory.published.add(request_id)
            for entity in sorted(cancelled):
                core.memory.cancelled.add(entity)
            lettered = await asyncio.to_thread(dead_lettered_events, settings, topics.dlq, since)
            events, bodies = core.memory.remember_letters(sorted(lettered))
            known += len(handled) + len(invalidated) + events + bodies
        core.open()
        core.count_memory()
        log.info(
            'sap connector started name="%s" routes="%s" known_events="%d" positions="%s"',
            self.name,
            ",".join(route.label for route in self.routes),
            known,
            core.positions,
        )

    async def close(self) -> None:
        await self.intake.save_event_checkpoint()
        await asyncio.to_thread(self.core.close)
        for route in self.routes:
            await route.odata.close()


async def serve(
    connector: SapConnector,
    *,
    host: str = "127.0.0.1",
    port: int | None = 8089,
    path: str = "/events",
    poll_interval_s: float | None = None,
    writeback: bool = True,
    stop: asyncio.Event | None = None,
    ready: Callable[[int | None], None] | None = None,
    security: WebhookSecurity | None = None,
) -> ConnectorStats:
    """Run the connector until ``stop`` (or SIGTERM/SIGINT): the receiver on ``host:port``
    (``port=None``: no receiver), polling every ``poll_interval_s`` (``None``: no polling),
    and the writeback loop. ``ready`` is called with the bound port once it listens.

    ``security`` guards the receiver (authentication, TLS, rate and size limits); without
    it, or without its verifier, only a loopback ``host`` is accepted (:func:`check_listen`).
    """
    security = security or WebhookSecurity()
    guard: WebhookGuard | None = None
    if port is not None:
        check_listen(host, security)
        guard = WebhookGuard(security)
        await guard.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await connector.start()
    runner: web.AppRunner | None = None
    bound: int | None = None
    tasks = [asyncio.create_task(connector.intake.run_checkpoints(stop), name="checkpoints")]
    try:
        if port is not None:
            runner = web.AppRunner(web_app(connector.intake, path, guard))
            await runner.setup()
            site = web.TCPSite(runner, host, port, ssl_context=security.tls)
            await site.start()
            addresses = runner.addresses
            bound = int(addresses[0][1]) if addresses else port
        if poll_interval_s is not None:
            tasks.append(
                asyncio.create_task(connector.polling.run(poll_interval_s, stop), name="polling")
            )
        if writeback:
            tasks.append(asyncio.create_task(connector.writeback.run(stop), name="writeback"))
        log.info('sap connector serving port="%s" path="%s"', bound, path)
        if ready is not None:
            ready(bound)
        stopped = asyncio.create_task(stop.wait(), name="stop")
        pending: set[asyncio.Task[Any]] = {stopped, *tasks}
        while stopped in pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stopped}:
                # A loop that ends with an error stops the connector with it (a supervisor
                # restarts it), rather than letting it run on half-working.
                failure = task.exception()
                if failure is not None:
                    log.error(
                        'sap connector task failed task="%s" error="%s"', task.get_name(), failure
                    )
                    raise failure
    finally:
        stop.set()
        if runner is not None:
            await runner.cleanup()
        await asyncio.gather(*tasks, return_exceptions=True)
        await connector.close()
    return connector.stats


__all__ = ["ConnectorStats", "Route", "SapConnector", "build_route", "serve"]
