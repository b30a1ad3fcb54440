"""``sluiceway control promote|rollback|pin``: tell every worker which version serves."""

from __future__ import annotations

import argparse
import getpass
import uuid
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Producer

from pipeline.kafka.admin import control_topic_spec, ensure_topics
from pipeline.kafka.exceptions import KafkaError
from pipeline.settings import Settings
from pipeline.topics import control_topic


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "control", help="promote, roll back or pin the version that serves a model"
    )
    parser.add_argument("action", choices=["promote", "rollback", "pin"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", required=True, help="the version that serves afterwards")
    parser.add_argument("--reason", default="manual decision")
    parser.set_defaults(handler=send_control_event)


def send_control_event(args: argparse.Namespace, settings: Settings) -> int:
    import schemas
    from schemas.models import ControlAction, ControlEvent

    event = ControlEvent(
        event_id=uuid.uuid4(),
        model=args.model,
        action=ControlAction(args.action),
        to_version=args.version,
        reason=args.reason,
        issued_at=datetime.now(UTC),
        issued_by=f"cli:{getpass.getuser()}",
    )
    ensure_topics(settings.kafka, [control_topic_spec(settings.namespace)])
    producer = Producer({**settings.kafka.client_config(), "acks": "all"})
    headers: list[tuple[str, str | bytes | None]] = list(schemas.message_headers(event.AVRO_NAME))
    failures: list[str] = []
    producer.produce(
        control_topic(settings.namespace),
        schemas.encode(event),
        key=args.model,
        headers=headers,
        on_delivery=lambda err, _msg: failures.append(str(err)) if err else None,
    )
    if producer.flush(15) or failures:
        raise KafkaError(f"control event not acknowledged: {failures or 'timeout'}")
    print(f"{args.action} {args.model} -> version {args.version} ({event.event_id})")
    return 0
