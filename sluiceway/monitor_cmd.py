"""``sluiceway monitor --model NAME``: watch results, report drift, roll back bad versions."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.settings import Settings, check_models_defined


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "monitor", help="run the drift and quality monitor (faust-streaming) for some models"
    )
    parser.add_argument("--model", action="append", required=True, help="repeat for more models")
    parser.add_argument("--log-level", default="info")
    parser.set_defaults(handler=run_monitor_command)


def run_monitor_command(args: argparse.Namespace, settings: Settings) -> int:
    from workers.monitor.app import run_monitor

    check_models_defined(settings, args.model)
    run_monitor(settings, args.model, loglevel=args.log_level)
    return 0
