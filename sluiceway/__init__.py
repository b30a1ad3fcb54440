"""The ``sluiceway`` command: one entry point, one module per subcommand.

Each module in :data:`RUNTIME_MODULES` and :data:`DEVELOPMENT_MODULES` exposes
``register(subparsers)``, which adds its parser and sets ``handler`` (a callable taking the
parsed namespace and the settings, and returning an exit code). Errors of ours end as one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline import __version__, tracing
from pipeline.settings import Settings, load_settings
from schemas.errors import SluicewayError

DEVELOPMENT_MODULES = (
    "sluiceway.stack_cmd",
    "sluiceway.demo_cmd",
    "sluiceway.model_cmd",
)
"""Commands of the local stack and the demo: registered only where the development wing
(``devkit``) is installed, which a deployment's image leaves out."""

RUNTIME_MODULES = (
    "sluiceway.acl_cmd",
    "sluiceway.settings_cmd",
    "sluiceway.worker_cmd",
    "sluiceway.control_cmd",
    "sluiceway.schemas_cmd",
    "sluiceway.monitor_cmd",
    "sluiceway.client_cmd",
    "sluiceway.topics_cmd",
    "sluiceway.batch_cmd",
    "sluiceway.api_cmd",
    "sluiceway.salesforce_cmd",
    "sluiceway.sap_cmd",
    "sluiceway.dlq_cmd",
    "sluiceway.objectstore_cmd",
)


def has_development_wing() -> bool:
    return importlib.util.find_spec("devkit") is not None


def subcommand_modules() -> tuple[str, ...]:
    return (DEVELOPMENT_MODULES if has_development_wing() else ()) + RUNTIME_MODULES


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
    for module_name in subcommand_modules():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        settings = _load_settings(args)
        # Every command that publishes or serves requests (worker, connectors, client)
        # traces them when ``tracing.otlp_endpoint`` is set; the rest record nothing.
        with tracing.configured(settings.tracing, f"sluiceway-{args.command}"):
            return handler(args, settings)
    except SluicewayError as exc:
        print(f"sluiceway: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("devkit"):
            raise
        print(
            "sluiceway: error: this needs the development wing (devkit/), which this install "
            "lacks: run it from a source checkout",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("sluiceway: interrupted", file=sys.stderr)
        return 130


def _load_settings(args: argparse.Namespace) -> Settings:
    if getattr(args, "local_stack", False):
        # The local stack's commands read the development wing's settings: the runtime's, the
        # stack section (SLUICEWAY_STACK__*) and the demo's models.
        from devkit.settings import load_local_settings

        return load_local_settings(args.config)
    return load_settings(args.config)


if __name__ == "__main__":
    sys.exit(main())
