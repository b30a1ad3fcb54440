"""``sluiceway stack up|down|status|logs|credentials|token``: the native local stack."""

from __future__ import annotations

import argparse
import shlex
import time
from collections.abc import Sequence
from typing import Any

from devkit.settings import LocalSettings
from devkit.stack import manager
from devkit.stack.exceptions import StackError
from devkit.stack.kafka_security import MECHANISMS, credential_environment
from devkit.stack.oauth import ensure_issuer
from devkit.stack.secrets import check_principal
from devkit.stack.services import resolve


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
    credentials = actions.add_parser(
        "credentials",
        help="secured stack: print SLUICEWAY_KAFKA__* lines to connect as a principal "
        "(includes its secret)",
    )
    credentials.add_argument("principal", help="worker-<model>, connector-<name>, monitor, ...")
    credentials.add_argument("--mechanism", choices=MECHANISMS, default="scram")
    token = actions.add_parser(
        "token", help="secured stack: print a JWT for a principal, signed by the stack issuer"
    )
    token.add_argument("principal")
    token.add_argument("--lifetime-s", type=float, default=3600.0)
    parser.set_defaults(handler=run_stack, local_stack=True)


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


def run_stack(args: argparse.Namespace, settings: LocalSettings) -> int:
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
    if action == "credentials":
        environment = credential_environment(settings, args.principal, args.mechanism)
        for name, value in environment.items():
            print(f"{name}={shlex.quote(value)}")
        return 0
    if action == "token":
        if not settings.stack.secured:
            raise StackError("the stack is not secured (stack.secured): it issues no tokens")
        issuer = ensure_issuer(resolve(settings.stack.state_dir))
        print(issuer.token(check_principal(args.principal), args.lifetime_s))
        return 0
    for name, tail in manager.logs(settings, args.service, args.lines).items():
        print(f"==> {name} <==\n{tail}\n")
    return 0
