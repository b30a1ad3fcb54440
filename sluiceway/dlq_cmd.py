"""``sluiceway dlq list|show|replay|purge|open``: an operator's work with dead letters.

``list`` counts a model's letters per reason (``--letters`` names each), ``show`` decodes one,
``replay`` sends a selection's originals back to their request topic with their request ids
(``--dry-run`` says what it would send; ``--version`` pins one), ``purge`` marks a selection
handled without sending anything. Replayed and purged letters are remembered in
``<ns>.<model>.dlq.handled`` (``pipeline/deadletters/markers.py``) and left out of every
selection unless ``--force``: a second replay of the same selection sends nothing.
``docs/operations.md`` is the operator's guide.

``open``: under ``workers.dead_letter_original: encrypt`` a letter's original value (or the
object its ``original_ref`` names) is an AES-GCM envelope. This command reads the letter at a
model's DLQ partition and offset, fetches an offloaded original, opens the envelope with
``workers.dead_letter_key`` or one of ``workers.dead_letter_retired_keys`` (the envelope names
its key id), and writes the original bytes to a file, or the decoded request as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.deadletters.letters import LetterId, StoredLetter, read_letter
from pipeline.deadletters.markers import Marker, encode_marker, fold_markers, marker_key
from pipeline.deadletters.replay import plan_replay
from pipeline.deadletters.selection import (
    count_by_reason,
    parse_name,
    parse_position,
    parse_selector,
    select,
)
from pipeline.privacy import ORIGINAL_HEADER, associated_data, decode_key, open_original
from pipeline.settings import Settings
from schemas.errors import SluicewayError
from schemas.models import DeadLetter


class LetterError(SluicewayError):
    """The letter cannot be read or holds no original to give back."""


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "dlq", help="read dead letters (decrypt an encrypted original)"
    )
    actions = parser.add_subparsers(dest="dlq_action", required=True, metavar="ACTION")
    opener = actions.add_parser("open", help="the original of one dead letter, decrypted")
    opener.add_argument("--model", required=True)
    opener.add_argument("--partition", type=int, required=True)
    opener.add_argument("--offset", type=int, required=True)
    opener.add_argument("--out", type=Path, help="write the original bytes here")
    opener.set_defaults(handler=open_command)

    lister = actions.add_parser("list", help="count a model's dead letters per reason")
    _add_selectors(lister)
    lister.add_argument("--letters", action="store_true", help="name each selected letter")
    lister.set_defaults(handler=list_command)

    shower = actions.add_parser("show", help="one dead letter decoded")
    shower.add_argument("--model", required=True)
    shower.add_argument("--letter", required=True, metavar="PARTITION:OFFSET")
    shower.add_argument("--json", action="store_true", help="print JSON")
    shower.set_defaults(handler=show_command)

    replayer = actions.add_parser("replay", help="send selected letters back to their topic")
    _add_selectors(replayer)
    replayer.add_argument("--version", help="pin the replayed requests to this model version")
    replayer.add_argument("--dry-run", action="store_true", help="say what would be sent")
    replayer.set_defaults(handler=replay_command)

    purger = actions.add_parser("purge", help="mark selected letters handled (nothing is sent)")
    _add_selectors(purger)
    purger.add_argument("--dry-run", action="store_true", help="say what would be marked")
    purger.set_defaults(handler=purge_command)


def _add_selectors(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True)
    parser.add_argument("--reason", action="append", default=[], help="repeatable")
    parser.add_argument("--since", help="last failure at or after: ISO 8601 or 15m, 2h, 7d ago")
    parser.add_argument("--until", help="last failure before: ISO 8601 or 15m, 2h, 7d ago")
    parser.add_argument(
        "--letter", action="append", default=[], metavar="PARTITION:OFFSET", help="repeatable"
    )
    parser.add_argument("--limit", type=int, help="at most this many, oldest first")
    parser.add_argument(
        "--force", action="store_true", help="include letters already replayed or purged"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def treatment_of(headers: Iterable[tuple[str, bytes | None]]) -> str:
    """``kept``, ``dropped`` or ``encrypted;key_id=...``: what the worker did to the original."""
    for name, value in headers:
        if name == ORIGINAL_HEADER:
            return (value or b"").decode(errors="replace")
    return "kept"


def original_of(
    letter: DeadLetter,
    headers: Iterable[tuple[str, bytes | None]],
    keys: Sequence[bytes],
    fetch: Callable[[str, str], bytes],
) -> bytes:
    """The letter's original value as it came, fetched (``fetch(bucket, key)``) when it was
    offloaded and opened when it was sealed. Raises :class:`LetterError` or
    :class:`~pipeline.privacy.PrivacyError` (wrong key, tampered, moved)."""
    treatment = treatment_of(headers)
    if treatment == "dropped":
        raise LetterError("the worker dropped this letter's original (dead_letter_original: drop)")
    value = letter.original_value
    if value is None and letter.original_ref is not None:
        bucket, _, key = letter.original_ref.removeprefix("s3://").partition("/")
        value = fetch(bucket, key)
    if value is None:
        raise LetterError("this letter holds no original value")
    if not treatment.startswith("encrypted"):
        return value
    aad = associated_data(letter.original_topic, letter.original_partition, letter.original_offset)
    return open_original(value, keys, aad)


def _keys(settings: Settings) -> list[bytes]:
    workers = settings.workers
    current = [workers.dead_letter_key] if workers.dead_letter_key is not None else []
    return [decode_key(k.get_secret_value()) for k in [*current, *workers.dead_letter_retired_keys]]


def _read_letter(
    settings: Settings, topic: str, partition: int, offset: int
) -> tuple[DeadLetter, list[tuple[str, bytes | None]]]:
    from confluent_kafka import TopicPartition

    import schemas
    from pipeline.kafka import clients
    from pipeline.kafka.clients import ConsumerRole

    consumer = clients.consumer(
        settings.kafka, group_id=clients.throwaway_group("dlq-open"), role=ConsumerRole.READER
    )
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        for message in consumer.consume(1, 15.0):
            if message.error() is None and message.offset() == offset:
                raw = message.headers() or []
                pairs = list(raw.items() if isinstance(raw, dict) else raw)
                headers = [(n, v.encode() if isinstance(v, str) else v) for n, v in pairs]
                return schemas.decode(message.value() or b"", DeadLetter), headers
    finally:
        consumer.close()
    raise LetterError(f"no dead letter at {topic}[{partition}] offset {offset}")


def _fetch(settings: Settings) -> Callable[[str, str], bytes]:
    def fetch(bucket: str, key: str) -> bytes:
        from pipeline.storage.client import make_client

        response = make_client(settings.object_store).get_object(bucket, key)
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()

    return fetch


def open_command(args: argparse.Namespace, settings: Settings) -> int:
    import schemas
    from pipeline.topics import ModelTopics

    topic = ModelTopics(settings.namespace, args.model).dlq
    letter, headers = _read_letter(settings, topic, args.partition, args.offset)
    original = original_of(letter, headers, _keys(settings), _fetch(settings))
    if args.out is not None:
        args.out.write_bytes(original)
        print(f"wrote {len(original)} bytes to {args.out}", file=sys.stderr)
        return 0
    try:
        request = schemas.decode(original)
    except Exception:  # not a request the worker could read: that is why it was dead-lettered
        sys.stdout.buffer.write(original)
        return 0
    print(json.dumps(request.model_dump(mode="json"), indent=2))
    return 0


# ---------------------------------------------------------------------------- list, show,
# replay, purge

READ_TIMEOUT_S = 15.0
Record = tuple[int, int, bytes | None, bytes | None, Any]
"""``(partition, offset, key, value, headers)`` of one consumed record."""


def _read_topic(settings: Settings, topic: str) -> list[Record]:
    """Every record of ``topic`` up to its end as of now (later ones are not waited for)."""
    from confluent_kafka import KafkaError, TopicPartition

    from pipeline.kafka import clients
    from pipeline.kafka.admin import end_offsets
    from pipeline.kafka.clients import ConsumerRole

    ends = {p: end for p, end in end_offsets(settings.kafka, topic).items() if end > 0}
    if not ends:
        return []
    consumer = clients.consumer(
        settings.kafka, group_id=clients.throwaway_group("dlq-read"), role=ConsumerRole.SNAPSHOT
    )
    records: list[Record] = []
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        pending = set(ends)
        while pending:
            message = consumer.poll(READ_TIMEOUT_S)
            if message is None:
                raise LetterError(f"{topic} did not answer within {READ_TIMEOUT_S:g}s")
            partition = int(message.partition() or 0)
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    raise LetterError(f"reading {topic}: {error}")
                pending.discard(partition)
                continue
            offset = int(message.offset() or 0)
            if offset < ends.get(partition, 0):
                records.append(
                    (partition, offset, message.key(), message.value(), message.headers())
                )
            if offset >= ends.get(partition, 0) - 1:
                pending.discard(partition)
    finally:
        consumer.close()
    return records


def _handled_topic(settings: Settings, model: str) -> str:
    from pipeline.kafka.admin import TopicSpec, ensure_topics
    from pipeline.topics import ModelTopics

    topic = ModelTopics(settings.namespace, model).dlq_handled
    spec = TopicSpec(topic, 1, config={"cleanup.policy": "compact", "min.compaction.lag.ms": "0"})
    ensure_topics(settings.kafka, [spec])
    return topic


def _model(settings: Settings, text: str) -> str:
    model = parse_name(text, "model")
    if model not in settings.models:
        raise LetterError(f"model {model!r} is not in settings.models")
    return model


def _letters_and_marks(
    settings: Settings, model: str
) -> tuple[list[StoredLetter], dict[LetterId, Marker]]:
    from pipeline.topics import ModelTopics

    dlq = ModelTopics(settings.namespace, model).dlq
    letters = [read_letter(p, o, v, h) for p, o, _, v, h in _read_topic(settings, dlq)]
    handled = fold_markers(
        (k, v) for _, _, k, v, _ in _read_topic(settings, _handled_topic(settings, model))
    )
    return letters, handled


def _selection(
    args: argparse.Namespace, settings: Settings
) -> tuple[str, list[StoredLetter], dict[LetterId, Marker]]:
    """The model, its selected letters, and which of its letters are handled."""
    model = _model(settings, args.model)
    selector = parse_selector(
        reasons=args.reason,
        since=args.since,
        until=args.until,
        at=args.letter,
        limit=args.limit,
        include_handled=args.force,
        now=datetime.now(UTC),
    )
    letters, handled = _letters_and_marks(settings, model)
    return model, select(letters, selector, handled), handled


def _summary(stored: StoredLetter, handled: dict[LetterId, Marker]) -> dict[str, Any]:
    letter = stored.letter
    marker = handled.get(stored.at)
    return {
        "letter": str(stored.at),
        "reason": stored.reason,
        "request_id": None if letter is None else letter.request_id,
        "last_failure_at": None if letter is None else letter.last_failure_at.isoformat(),
        "handled": None if marker is None else marker.state,
        "problem": stored.problem,
    }


def list_command(args: argparse.Namespace, settings: Settings) -> int:
    model, chosen, handled = _selection(args, settings)
    counts = count_by_reason(chosen)
    if args.json:
        report: dict[str, Any] = {"model": model, "total": len(chosen), "by_reason": counts}
        if args.letters:
            report["letters"] = [_summary(s, handled) for s in chosen]
        print(json.dumps(report, indent=2))
        return 0
    print(f"{len(chosen)} dead letters of {model}" + ("" if args.force else " (not handled)"))
    for reason, count in counts.items():
        print(f"  {count:>8}  {reason}")
    for stored in chosen if args.letters else ():
        row = _summary(stored, handled)
        print(
            f"{row['letter']:>12}  {row['reason']:<24} {row['request_id'] or '-'}  "
            f"{row['last_failure_at'] or row['problem']}  {row['handled'] or ''}"
        )
    return 0


def show_command(args: argparse.Namespace, settings: Settings) -> int:
    import schemas

    model = _model(settings, args.model)
    at = parse_position(args.letter)
    letters, handled = _letters_and_marks(settings, model)
    stored = next((s for s in letters if s.at == at), None)
    if stored is None:
        raise LetterError(f"no record at {at} in {model}'s DLQ")
    shown: dict[str, Any] = _summary(stored, handled)
    shown["headers"] = {
        name: (value or b"").decode("utf-8", "replace") for name, value in stored.headers
    }
    letter = stored.letter
    if letter is not None:
        shown["letter_fields"] = letter.model_dump(
            mode="json", exclude={"original_value", "original_key"}
        )
        shown["original_key"] = (letter.original_key or b"").decode("utf-8", "replace") or None
        try:
            original = original_of(letter, stored.headers, _keys(settings), _fetch(settings))
            shown["original_request"] = schemas.decode(original).model_dump(mode="json")
        except Exception as error:  # not every original is a request: that may be the reason
            shown["original_request"] = None
            shown["original_problem"] = f"{type(error).__name__}: {str(error)[:200]}"
    print(json.dumps(shown, indent=2, default=str))
    return 0


Outgoing = tuple[str, bytes | None, bytes, Sequence[tuple[str, bytes | None]]]
"""``(topic, key, value, headers)`` of one record to send."""


def _send_acked(settings: Settings, records: Sequence[Outgoing], label: str | None = None) -> None:
    """Send ``records`` and return once the broker acknowledged every one (with a progress
    bar on stderr under ``label``); raises :class:`LetterError` otherwise."""
    from pipeline.console import ProgressBar
    from pipeline.kafka import clients
    from pipeline.kafka.clients import ProducerRole

    producer = clients.producer(settings.kafka, role=ProducerRole.RELIABLE)
    bar = None if label is None else ProgressBar(label, len(records))
    failures: list[str] = []

    def delivered(error: Any, _message: Any) -> None:
        if error is not None:
            failures.append(str(error))
        if bar is not None:
            bar.advance()

    for topic, key, value, headers in records:
        while True:
            try:
                producer.produce(
                    topic, value, key=key, headers=list(headers), on_delivery=delivered
                )
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.1)
        producer.poll(0)
    remaining = producer.flush(60)
    if bar is not None:
        bar.close()
    if remaining or failures:
        raise LetterError(f"not acknowledged: {failures[:1] or f'{remaining} pending'}")


def _mark(settings: Settings, model: str, marks: Sequence[tuple[LetterId, Marker]]) -> None:
    topic = _handled_topic(settings, model)
    _send_acked(settings, [(topic, marker_key(at), encode_marker(m), ()) for at, m in marks])


def replay_command(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.topics import ModelTopics

    version = None if args.version is None else parse_name(args.version, "version")
    model, chosen, _ = _selection(args, settings)
    topics = ModelTopics(settings.namespace, model)
    fetch = _fetch(settings)
    keys = _keys(settings)

    def original(stored: StoredLetter) -> bytes:
        assert stored.letter is not None
        return original_of(stored.letter, stored.headers, keys, fetch)

    resends, skipped = plan_replay(
        chosen,
        dlq_topic=topics.dlq,
        allowed_topics={topics.requests, topics.batch},
        original=original,
        pinned_version=version,
    )
    if not args.dry_run and resends:
        # Step 1: every original acknowledged; step 2: only then marked (docs/operations.md).
        _send_acked(settings, [(r.topic, r.key, r.value, r.headers) for r in resends], "replay")
        now = datetime.now(UTC)
        _mark(settings, model, [(r.at, Marker("replayed", now, r.topic, version)) for r in resends])
    report = {
        "model": model,
        "dry_run": args.dry_run,
        "selected": len(chosen),
        "replayed": 0 if args.dry_run else len(resends),
        "would_replay": len(resends) if args.dry_run else 0,
        "by_reason": count_by_reason(s for s in chosen if s.at in {r.at for r in resends}),
        "skipped": [{"letter": str(s.at), "why": s.why} for s in skipped],
        "request_ids": [r.request_id for r in resends],
    }
    _print_report(report, args.json)
    return 0 if not skipped else 1


def purge_command(args: argparse.Namespace, settings: Settings) -> int:
    model, chosen, _ = _selection(args, settings)
    if not args.dry_run and chosen:
        now = datetime.now(UTC)
        _mark(settings, model, [(s.at, Marker("purged", now)) for s in chosen])
    report = {
        "model": model,
        "dry_run": args.dry_run,
        "purged": 0 if args.dry_run else len(chosen),
        "would_purge": len(chosen) if args.dry_run else 0,
        "by_reason": count_by_reason(chosen),
    }
    _print_report(report, args.json)
    return 0


def _print_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    for name, value in report.items():
        if name != "request_ids":
            print(f"{name}: {value}")
