"""The ``sluiceway`` command: one entry point, one module per subcommand.

Each module in :data:`SUBCOMMAND_MODULES` exposes ``register(subparsers)``, which adds its
parser and sets ``handler`` (a callable taking the parsed namespace and the settings, and
returning an exit code). Errors of ours end as one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline import __version__, tracing
from pipeline.settings import Settings, load_settings
from schemas.errors import SluicewayError

SUBCOMMAND_MODULES = (
    "pipeline.cli.stack_cmd",
    "pipeline.cli.acl_cmd",
    "pipeline.cli.settings_cmd",
    "pipeline.cli.demo_cmd",
    "pipeline.cli.worker_cmd",
    "pipeline.cli.control_cmd",
    "pipeline.cli.schemas_cmd",
    "pipeline.cli.model_cmd",
    "pipeline.cli.monitor_cmd",
    "pipeline.cli.client_cmd",
    "pipeline.cli.topics_cmd",
    "pipeline.cli.batch_cmd",
    "pipeline.cli.api_cmd",
    "pipeline.cli.salesforce_cmd",
    "pipeline.cli.sap_cmd",
    "pipeline.cli.dlq_cmd",
    "pipeline.cli.objectstore_cmd",
)

Handler = Callable[[argparse.Namespace, Settings], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluiceway",
        description="Event-driven batch and async inference: Kafka in, Triton/vLLM, S3 out.",
    )
    parser.add_argument("--version", action="version", version=f"sluiceway {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML settings file (default: $SLUICEWAY_CONFIG, if set)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        settings = load_settings(args.config)
        # Every command that publishes or serves requests (worker, connectors, client)
        # traces them when ``tracing.otlp_endpoint`` is set; the rest record nothing.
        with tracing.configured(settings.tracing, f"sluiceway-{args.command}"):
            return handler(args, settings)
    except SluicewayError as exc:
        print(f"sluiceway: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sluiceway: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
