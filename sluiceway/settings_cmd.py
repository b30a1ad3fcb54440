"""``sluiceway settings``: print the effective settings tree, secrets masked."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipeline.settings import Settings


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "settings", help="print the effective settings (secrets masked)"
    )
    parser.set_defaults(handler=show_settings)


def show_settings(args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(settings.as_dict(), indent=2, sort_keys=True))
    return 0
