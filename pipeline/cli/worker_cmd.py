"""``sluiceway worker --model NAME``: serve one or more models until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from pipeline.settings import Settings


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "worker", help="run the inference worker for one or more models"
    )
    parser.add_argument("--model", action="append", required=True, help="repeat for more models")
    parser.add_argument("--log-level", default="INFO")
    parser.set_defaults(handler=run_worker_command)


def run_worker_command(args: argparse.Namespace, settings: Settings) -> int:
    from workers.inference.runner import configure_logging, run_worker

    configure_logging(args.log_level)
    stats = asyncio.run(run_worker(settings, args.model))
    print(
        f"worker stopped: consumed={stats.consumed} results={stats.results} "
        f"batches={stats.batches} "
        f"dead_lettered={stats.dead_lettered} expired={stats.expired} commits={stats.commits}"
    )
    return 0
