"""Intake: one consumed message in, a :class:`Record` to serve or a :class:`Refusal` out.

Pure: decoding, validation against what the model declares, and the trust boundary (reply
topic, pinned version). Nothing here raises for anything a message carries; every way a
message can be wrong ends in a typed refusal with a reason code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pipeline import privacy
from pipeline.backends import RowInput
from pipeline.backends.signature import ModelSignature
from pipeline.batching import Lane
from pipeline.kafka.ports import ConsumedMessage
from pipeline.routing import RoutingTable
from pipeline.settings import Settings
from schemas.errors import UnservableRecord
from schemas.models import InferenceRequest
from workers.inference import contracts
from workers.inference.boundary import ReplyPolicy, VersionPolicy
from workers.inference.contracts import RefusedRequest

log = logging.getLogger("sluiceway.worker.intake")


@dataclass(slots=True)
class Record:
    """An accepted request on its way through the worker."""

    message: ConsumedMessage
    request: InferenceRequest
    row: RowInput
    model: str
    version: str | None
    lane: Lane
    received_at: float
    reply_to: str | None
    """The request's reply topic, only when the allow-list admits it."""
    epoch: int = 0
    """The assignment of its partition it was consumed under: a record of an older one is
    never requeued (its partition was revoked, and the new owner serves it)."""

    @property
    def partition_key(self) -> tuple[str, int]:
        return (str(self.message.topic()), int(self.message.partition() or 0))

    @property
    def offset(self) -> int:
        return int(self.message.offset() or 0)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A message that will not be served, and why.

    ``dead_letter``: the record itself is bad (it goes to the DLQ); otherwise the request was
    well-formed but asked for what it may not, and is answered ``rejected`` on the results
    topic. Either way an allowed ``reply_to`` gets a ``rejected`` reply.
    """

    message: ConsumedMessage
    model: str
    reason: str
    detail: str
    error_class: str
    dead_letter: bool
    request: InferenceRequest | None = None
    reply_to: str | None = None
    attempts: int = 0

    @property
    def partition_key(self) -> tuple[str, int]:
        return (str(self.message.topic()), int(self.message.partition() or 0))

    @property
    def offset(self) -> int:
        return int(self.message.offset() or 0)


class Intake:
    """Turns messages of one worker's topics into records or refusals."""

    def __init__(
        self,
        settings: Settings,
        routing: RoutingTable,
        signatures: Mapping[str, ModelSignature],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._routing = routing
        self._signatures = signatures
        self._clock = clock
        self._wall_clock = wall_clock
        self.replies = ReplyPolicy(settings.workers.reply_to_patterns, settings.namespace)
        self.versions = VersionPolicy(
            settings.workers.version_pattern, signatures.get, self._routed_versions
        )

    def _routed_versions(self, model: str) -> set[str]:
        version = self._routing.version_for(model)
        return {version} if version else set()

    def admit(
        self, message: ConsumedMessage, model: str, lane: Lane, epoch: int = 0
    ) -> Record | Refusal:
        request: InferenceRequest | None = None
        reply_to: str | None = None
        try:
            request = contracts.decode_request(
                message.value() or b"", self._settings.workers.max_message_bytes
            )
            reply_to = request.reply_to if self.replies.allows(request.reply_to) else None
            return self._accept(message, request, model, lane, epoch, reply_to)
        except UnservableRecord as unservable:
            return Refusal(
                message,
                model,
                unservable.reason_code,
                unservable.message,
                unservable.error_class,
                dead_letter=not isinstance(unservable, RefusedRequest),
                request=request,
                reply_to=reply_to,
            )
        except Exception as error:
            # A record that breaks the decoder in a way no rule foresaw is still bad input:
            # it goes to the DLQ under its own reason; the log keeps the trace for a fix.
            # Its message may quote the record: only its type and where it came from.
            log.error(
                'unforeseen intake failure topic="%s" offset="%s" error="%s" at="%s"',
                message.topic(),
                message.offset(),
                type(error).__name__,
                privacy.code_trace(error),
            )
            return Refusal(
                message,
                model,
                "unprocessable",
                privacy.withheld(error),
                type(error).__name__,
                dead_letter=True,
                request=request,
                reply_to=reply_to,
            )

    def _accept(
        self,
        message: ConsumedMessage,
        request: InferenceRequest,
        model: str,
        lane: Lane,
        epoch: int,
        reply_to: str | None,
    ) -> Record:
        contracts.check_model(request, model)
        if request.reply_to is not None and reply_to is None:
            raise RefusedRequest(
                "reply_to_not_allowed",
                "reply_to names a topic outside the allowed reply topics "
                f"({', '.join(self.replies.patterns)})",
            )
        version = request.model_version
        if version is not None:
            verdict = self.versions.judge(model, version)
            if not verdict.allowed:
                raise RefusedRequest("unknown_version", verdict.detail)
        else:
            version = self._routing.version_for(model, contracts.routing_key(request, message))
        row = contracts.to_row(request, self._settings.models[model], self._signatures.get(model))
        return Record(message, request, row, model, version, lane, self._clock(), reply_to, epoch)

    def deadline(self, request: InferenceRequest) -> float | None:
        """The request's deadline on the monotonic clock."""
        deadline_ms = contracts.deadline_ms(request)
        if deadline_ms is None:
            return None
        return self._clock() + (deadline_ms / 1000.0 - self._wall_clock())
