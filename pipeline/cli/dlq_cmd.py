"""``sluiceway dlq open``: an operator reads the original of one dead letter.

Under ``workers.dead_letter_original: encrypt`` a letter's original value (or the object its
``original_ref`` names) is an AES-GCM envelope. This command reads the letter at a model's DLQ
partition and offset, fetches an offloaded original, opens the envelope with
``workers.dead_letter_key`` or one of ``workers.dead_letter_retired_keys`` (the envelope names
its key id), and writes the original bytes to a file, or the decoded request as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import SluicewayError
from pipeline.privacy import ORIGINAL_HEADER, associated_data, decode_key, open_original
from pipeline.settings import Settings
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
