"""``sluiceway api``: the OpenAI-compatible Batch and Files API (docs/api.md)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from pipeline.settings import Settings


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "api", help="serve the OpenAI-compatible Batch and Files API over batch jobs"
    )
    parser.add_argument("--host", default=None, help="default: api.host")
    parser.add_argument("--port", type=int, default=None, help="default: api.port")
    parser.add_argument("--log-level", default="INFO")
    parser.set_defaults(handler=api_command)


def api_command(args: argparse.Namespace, settings: Settings) -> int:
    from workers.api.server import serve
    from workers.inference.runner import configure_logging

    configure_logging(args.log_level)
    host = args.host or settings.api.host
    port = args.port or settings.api.port
    asyncio.run(serve(settings, host, port))
    return 0
