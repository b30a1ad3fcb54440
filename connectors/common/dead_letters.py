"""Dead-lettering source records that can never become requests.

A record a connector cannot map (a missing field, a malformed event) goes to the model's DLQ,
``<ns>.<model>.dlq``, as the same ``DeadLetter`` contract and headers the worker writes, with
the source payload as ``original_value``, so nothing is dropped silently and the record can be
fixed and replayed. A connector record has no Kafka origin: ``original_topic`` names the source
as ``connector:<source system>`` and partition and offset are 0.

Personal data: a connector's letters follow the worker's rules (``docs/worker.md``, "Personal
data"). The source payload is kept, sealed or dropped as ``workers.dead_letter_original`` says
(the worker's own :class:`~pipeline.privacy.OriginalPolicy`, bound to ``connector:<source>``,
partition 0, offset 0, so ``sluiceway dlq open`` opens it), and where the model has a ``pii``
policy the letter's text loses every value the record holds. A connector for such a model
refuses to start with ``dead_letter_original: keep``, as its worker does
(:func:`letter_privacy`).

Once per source event: a letter names the source event it is about in the
:data:`SOURCE_EVENT_HEADER` header, by the connector's dedupe key (ids and digests, never a
value of the record). A connector remembers the keys of the letters it wrote, and at start
reads them back from the DLQ's headers alone (no decoding, no decryption), so a redelivered
or replayed event is a duplicate, not a second letter.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaException, Producer

import schemas
from connectors.common.exceptions import DeadLetterError
from pipeline.kafka import clients
from pipeline.kafka.clients import ProducerRole
from pipeline.privacy import (
    KEEP_ORIGINALS,
    FeatureValue,
    OriginalPolicy,
    configuration_problems,
    original_policy,
    scrub_values,
)
from pipeline.settings import Settings, SettingsError
from pipeline.topics import ModelTopics
from schemas.errors import UnservableRecord
from schemas.headers import connect_error_headers, dead_letter_headers
from schemas.models import DeadLetter, Header

UNSERVABLE_ERROR_CLASS = UnservableRecord.__name__
"""The error-class header of a connector's letter for a record that can never be served: the
one type's name, as the worker's letters carry it (filter on the reason code, which is stable)."""
WITHHELD = "(detail withheld: it may quote the record)"
"""A personal model's letter text when the record's values cannot be found to remove them."""
_NOT_A_VALUE = re.compile(r"[\s\"'`{}\[\](),;:=&<>|]+")
"""Where a payload that is not JSON is cut into the words that may be its values."""
SOURCE_EVENT_HEADER = "sluiceway-source-event"
"""The header of a connector letter that names its source event (:func:`source_event_key`)."""
_MAX_SOURCE_EVENT_KEY = 256


def source_event_key(raw: str) -> str:
    """``raw`` (a connector's dedupe key of a source event) as a letter carries it: as it is
    when short printable ASCII, else its digest. Source ids are chosen by whoever sends the
    event: a header must stay small and plain whatever they are. Applying it twice changes
    nothing, so a connector remembers exactly what its letters carry."""
    if len(raw) <= _MAX_SOURCE_EVENT_KEY and raw.isascii() and raw.isprintable():
        return raw
    digest = hashlib.blake2b(raw.encode("utf-8", "surrogatepass"), digest_size=16)
    return f"digest:{digest.hexdigest()}"


KafkaHeaders = Mapping[str, bytes | str | None] | Sequence[tuple[str, bytes | str | None]] | None
"""Headers as a consumed message gives them (a list of pairs; a mapping in the stubs too)."""


def letter_source_event(headers: KafkaHeaders) -> str | None:
    """The source-event key in a letter's ``headers``; ``None`` where there is not exactly one
    well-formed key (a worker's letter has none; a repeated, oversized or non-UTF-8 one is
    no key this module wrote, and remembering it could only hide an event)."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
    values = [value for name, value in pairs if name == SOURCE_EVENT_HEADER]
    if len(values) != 1 or values[0] is None:
        return None
    value = values[0]
    try:
        key = value.decode("utf-8") if isinstance(value, bytes) else value
    except UnicodeDecodeError:
        return None
    return key if key and source_event_key(key) == key else None


@dataclass(frozen=True)
class LetterPrivacy:
    """What one model's connector letters may carry of the source record."""

    originals: OriginalPolicy = KEEP_ORIGINALS
    personal: bool = False
    """The model has a ``pii`` policy: the letter's text (and the connector's log line about
    it) may not quote any value of the record, whichever field it came from."""

    def text(self, message: str, payload: bytes) -> str:
        """``message`` as a letter may carry it."""
        if not self.personal:
            return message
        try:
            return scrub_values(message, record_values(payload))
        except Exception:  # scrubbing must never cost a letter; then say nothing of it
            return WITHHELD


AS_RECEIVED = LetterPrivacy()


def letter_privacy(settings: Settings, model: str) -> LetterPrivacy:
    """The letter rules of ``model``'s connector; raises :class:`SettingsError` where the
    model's worker would refuse to start (a ``pii`` policy with ``dead_letter_original:
    keep``, a hash without a key): the same check, through the same function."""
    if model not in settings.models:
        raise SettingsError(f"model {model!r} is not in settings.models")
    problems = configuration_problems(
        {model: settings.models[model].pii.values()},
        dead_letter_original=settings.workers.dead_letter_original,
        has_hash_key=settings.workers.pii_hash_key is not None,
    )
    if problems:
        raise SettingsError("; ".join(problems))
    return LetterPrivacy(original_policy(settings), personal=bool(settings.models[model].pii))


def record_values(payload: bytes) -> list[FeatureValue]:
    """Every value a source payload holds: the leaves of its JSON (names are not values), or
    where it is no JSON, each word of it."""
    text = payload.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return [word for word in _NOT_A_VALUE.split(text) if word]
    return list(_leaves(data))


def _leaves(data: Any) -> Iterator[FeatureValue]:
    pending = [data]  # a loop, not recursion: a hostile payload nests as deep as it likes
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, bool | int | float | str):
            yield item


@dataclass(frozen=True)
class ConnectorLetter:
    """A dead letter and the headers saying how its original value was treated."""

    letter: DeadLetter
    treatment: list[tuple[str, bytes]] = field(default_factory=list)
    source_event: str | None = None
    """The connector's dedupe key of the source event (:data:`SOURCE_EVENT_HEADER`)."""


def unmappable_letter(
    *,
    model: str,
    source_payload: bytes,
    reason_code: str,
    message: str,
    source_system: str,
    source_key: str | None = None,
    source_headers: dict[str, str] | None = None,
    request_id: str | None = None,
    connector: str | None = None,
    error_class: str = UNSERVABLE_ERROR_CLASS,
    now: datetime | None = None,
    privacy: LetterPrivacy = AS_RECEIVED,
    source_event: str | None = None,
) -> ConnectorLetter:
    """The dead letter for one unmappable source record (pure but for a sealing nonce)."""
    moment = now or datetime.now(UTC)
    headers = [
        Header(key=name[:256], value=value.encode("utf-8"))
        for name, value in (source_headers or {}).items()
    ]
    origin = f"connector:{source_system}"[:256]
    value, treatment = privacy.originals.protect(source_payload, origin, 0, 0)
    # Scrubbed before it is cut: a cut could leave half a value that no longer matches.
    message = privacy.text(message, source_payload)
    letter = DeadLetter(
        original_topic=origin,
        original_partition=0,
        original_offset=0,
        original_key=None if source_key is None else source_key.encode("utf-8"),
        original_value=value,
        original_headers=headers or None,
        original_timestamp=None,
        error_class=error_class[:200] or UNSERVABLE_ERROR_CLASS,
        reason_code=reason_code[:256] or "unmappable",
        reason_message=message[:4000] or reason_code,
        attempts=1,
        first_failure_at=moment,
        last_failure_at=moment,
        request_id=request_id,
        model=model,
        worker_id=connector,
    )
    event = None if source_event is None else source_event_key(source_event)
    return ConnectorLetter(letter, treatment, event)


def encode_letter(sealed: ConnectorLetter) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The letter's bytes and the worker's dead-letter headers (reason readable undecoded,
    and how the original was treated)."""
    letter = sealed.letter
    named = [] if sealed.source_event is None else [(SOURCE_EVENT_HEADER, sealed.source_event)]
    return schemas.encode(letter), [
        *dead_letter_headers(letter.reason_code, letter.error_class, letter.attempts),
        *connect_error_headers(
            letter.original_topic,
            letter.original_partition,
            letter.original_offset,
            letter.error_class,
            letter.reason_message,
        ),
        *sealed.treatment,
        *[(name, value.encode("utf-8")) for name, value in named],
    ]


def send_unmappable(
    settings: Settings,
    *,
    model: str,
    source_payload: bytes,
    reason_code: str,
    message: str,
    source_system: str,
    producer: Producer | None = None,
    source_key: str | None = None,
    source_headers: dict[str, str] | None = None,
    request_id: str | None = None,
    connector: str | None = None,
    timeout_s: float = 10.0,
    privacy: LetterPrivacy | None = None,
    source_event: str | None = None,
) -> DeadLetter:
    """Write one unmappable record to ``<ns>.<model>.dlq`` and wait for the broker's ack;
    returns the letter as written (its original and text protected: safe to log).

    Pass a long-lived ``producer`` (``acks=all``) where records are dead-lettered often; without
    one, a producer is made for this letter. ``privacy`` defaults to the model's rules from
    ``settings`` (:func:`letter_privacy`). ``source_event`` is the connector's dedupe key of
    the source event, carried in :data:`SOURCE_EVENT_HEADER` (:func:`source_event_key`).
    Raises :class:`DeadLetterError` unless acked.
    """
    sealed = unmappable_letter(
        model=model,
        source_payload=source_payload,
        reason_code=reason_code,
        message=message,
        source_system=source_system,
        source_key=source_key,
        source_headers=source_headers,
        request_id=request_id,
        connector=connector,
        privacy=privacy or letter_privacy(settings, model),
        source_event=source_event,
    )
    value, headers = encode_letter(sealed)
    topic = ModelTopics(settings.namespace, model).dlq
    sender = producer or clients.producer(settings.kafka, role=ProducerRole.RELIABLE)
    failures: list[str] = []
    try:
        sender.produce(
            topic,
            value,
            key=source_key,
            headers=list(headers),
            on_delivery=lambda error, _message: (
                failures.append(error.str()) if error is not None else None
            ),
        )
    except (BufferError, KafkaException) as exc:
        raise DeadLetterError(f"dead letter to {topic}: {exc}") from exc
    remaining = sender.flush(timeout_s)
    if remaining or failures:
        raise DeadLetterError(
            f"dead letter to {topic} not acknowledged: {failures[0] if failures else 'timeout'}"
        )
    return sealed.letter
