"""``sluiceway control promote|rollback|pin``: tell every worker which version serves."""

from __future__ import annotations

import argparse
import getpass
import uuid
from datetime import UTC, datetime
from typing import Any

from pipeline.kafka.admin import control_topic_spec, ensure_topics
from pipeline.kafka.events import send_events
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
    send_events(settings.kafka, control_topic(settings.namespace), [(args.model, event)])
    print(f"{args.action} {args.model} -> version {args.version} ({event.event_id})")
    return 0
