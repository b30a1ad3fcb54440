"""``sluiceway control promote|rollback|pin``: tell every worker which version serves."""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from pipeline.settings import Settings


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
    from pipeline.kafka.events import send_control
    from schemas.models import ControlAction

    event = send_control(
        settings,
        args.model,
        ControlAction(args.action),
        args.version,
        reason=args.reason,
        issued_by=f"cli:{getpass.getuser()}",
    )
    print(f"{args.action} {args.model} -> version {args.version} ({event.event_id})")
    return 0
