"""``sluiceway stack up|down|status|logs``: the native local stack (no Docker needed)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from pipeline.settings import Settings
from pipeline.stack import manager


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "stack", help="run Kafka, MinIO and Triton locally without Docker"
    )
    actions = parser.add_subparsers(dest="stack_action", required=True, metavar="ACTION")
    actions.add_parser("up", help="install (first run) and start; reuses a healthy stack")
    actions.add_parser("down", help="stop the processes the stack started")
    actions.add_parser("status", help="show each service's state, version and endpoint")
    logs_parser = actions.add_parser("logs", help="print the end of the services' logs")
    logs_parser.add_argument("service", nargs="?", choices=["kafka", "minio", "triton"])
    logs_parser.add_argument("-n", "--lines", type=int, default=40)
    parser.set_defaults(handler=run_stack)


def format_table(rows: Sequence[manager.ServiceStatus]) -> str:
    header = ("SERVICE", "STATE", "PID", "VERSION", "ENDPOINT")
    body = [
        (
            row.name,
            row.state + (" (reused)" if row.reused else ""),
            str(row.pid or "-"),
            row.version,
            row.endpoint,
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *body]
    )


def run_stack(args: argparse.Namespace, settings: Settings) -> int:
    action: str = args.stack_action
    if action == "up":
        started = time.monotonic()
        rows = manager.up(settings)
        print(format_table(rows))
        print(f"stack is up ({time.monotonic() - started:.1f}s)")
        return 0
    if action == "down":
        stopped = manager.down(settings)
        print(f"stopped: {', '.join(stopped)}" if stopped else "nothing of ours was running")
        return 0
    if action == "status":
        rows = manager.status(settings)
        print(format_table(rows))
        return 0 if all(row.state == "healthy" for row in rows) else 1
    for name, tail in manager.logs(settings, args.service, args.lines).items():
        print(f"==> {name} <==\n{tail}\n")
    return 0
