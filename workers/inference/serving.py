"""BatchServer: one micro-batch in, a :class:`BatchOutcome` out. It never raises.

1. The breaker may refuse the call: the whole batch goes back to wait.
2. Transient errors are retried with backoff and jitter (never past a record's deadline);
   out of retries, the batch goes back to wait for the backend.
3. A batch the backend refuses as invalid, or that fails in any unforeseen way, is split in
   halves and each half served on its own, down to single records: only the records that
   fail alone are refused, their neighbours are served.
4. A refusal that concerns every record alike (the version is not loaded) is not split.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from pipeline import privacy
from pipeline.backends import Backend, BackendError, RowOutput
from pipeline.batching import Batch, Pending
from pipeline.deadlines import batch_priority
from pipeline.resilience import CircuitBreaker, RetryPolicy
from workers.inference.intake import Record

log = logging.getLogger("sluiceway.worker.serving")

WHOLE_BATCH_REASONS = frozenset({"unknown_model"})
"""Permanent errors that hold for every record of the batch alike: splitting cannot help."""


@dataclass(frozen=True, slots=True)
class RecordFailure:
    record: Record
    reason: str
    detail: str
    error_class: str
    attempts: int


@dataclass
class BatchOutcome:
    served: list[tuple[Record, RowOutput]] = field(default_factory=list)
    failed: list[RecordFailure] = field(default_factory=list)
    waiting: list[Pending[Record]] = field(default_factory=list)
    """Items to put back in the batcher: the backend is unavailable for now."""
    backend_s: float = 0.0
    splits: int = 0


class BatchServer:
    """Serves batches of one backend, through its breaker, with retries and bisection."""

    def __init__(
        self,
        backend: Backend,
        breaker_for: Callable[[str], CircuitBreaker],
        retry: RetryPolicy,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_retry: Callable[[str, int, float, str], None] | None = None,
    ) -> None:
        self._backend = backend
        self._breaker_for = breaker_for
        self._retry = retry
        self._clock = clock
        self._sleep = sleep
        self._on_retry = on_retry

    async def serve(self, batch: Batch[tuple[str, str | None], Record]) -> BatchOutcome:
        model, version = batch.key
        outcome = BatchOutcome()
        started = self._clock()
        await self._serve_items(model, version, list(batch.items), outcome, started)
        outcome.backend_s = self._clock() - started
        return outcome

    async def _serve_items(
        self,
        model: str,
        version: str | None,
        items: list[Pending[Record]],
        outcome: BatchOutcome,
        started: float,
    ) -> None:
        breaker = self._breaker_for(model)
        attempts = 0
        while True:
            if not breaker.allow():
                outcome.waiting.extend(items)
                return
            attempts += 1
            call_started = self._clock()
            try:
                outputs = await self._backend.infer(
                    model,
                    version,
                    [p.item.row for p in items],
                    time_left_s=_time_left(items, self._clock()),
                    priority=batch_priority(p.item.request.priority for p in items),
                )
                if len(outputs) != len(items):
                    raise ValueError(f"backend answered {len(outputs)} outputs for {len(items)}")
            except BackendError as error:
                duration = self._clock() - call_started
                if not error.transient:
                    breaker.record_success(duration)  # the backend answered; the input is wrong
                    await self._refused(model, version, items, error, attempts, outcome, started)
                    return
                breaker.record_failure(duration)
                delay = self._retry.next_delay(
                    attempts,
                    self._clock() - started,
                    _time_left(items, self._clock()),
                    not_before_s=error.retry_after_s,
                )
                if delay is None:
                    outcome.waiting.extend(items)  # out of retries, not out of hope
                    return
                if self._on_retry is not None:
                    self._on_retry(model, attempts, delay, error.reason)
                await self._sleep(delay)
                continue
            except Exception as error:
                breaker.record_success(self._clock() - call_started)
                # The message of an unforeseen error may quote the batch's values: never
                # logged or sent on, only its type and where it came from.
                log.warning(
                    'model="%s" batch of %d failed unexpectedly error="%s" at="%s"',
                    model,
                    len(items),
                    type(error).__name__,
                    privacy.code_trace(error),
                )
                await self._refused(
                    model,
                    version,
                    items,
                    BackendError(privacy.withheld(error), reason="unprocessable"),
                    attempts,
                    outcome,
                    started,
                    error_class=type(error).__name__,
                )
                return
            breaker.record_success(self._clock() - call_started)
            for pending, output in zip(items, outputs, strict=True):
                if isinstance(output, BackendError):
                    if output.transient:
                        outcome.waiting.append(pending)
                    else:
                        outcome.failed.append(_failure(pending.item, output, attempts))
                else:
                    outcome.served.append((pending.item, output))
            return

    async def _refused(
        self,
        model: str,
        version: str | None,
        items: list[Pending[Record]],
        error: BackendError,
        attempts: int,
        outcome: BatchOutcome,
        started: float,
        error_class: str | None = None,
    ) -> None:
        """Refuse a lone record; split a larger batch so only the bad records are refused."""
        if len(items) == 1 or error.reason in WHOLE_BATCH_REASONS:
            outcome.failed.extend(_failure(p.item, error, attempts, error_class) for p in items)
            return
        outcome.splits += 1
        middle = len(items) // 2
        await asyncio.gather(
            self._serve_items(model, version, items[:middle], outcome, started),
            self._serve_items(model, version, items[middle:], outcome, started),
        )


def _failure(
    record: Record, error: BackendError, attempts: int, error_class: str | None = None
) -> RecordFailure:
    return RecordFailure(
        record, error.reason, str(error), error_class or type(error).__name__, attempts
    )


def _time_left(items: Sequence[Pending[Record]], now: float) -> float | None:
    deadlines = [p.deadline for p in items if p.deadline is not None]
    return min(deadlines) - now if deadlines else None
