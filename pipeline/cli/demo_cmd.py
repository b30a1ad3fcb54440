"""``sluiceway demo``: one real round trip on the running stack, summarised."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.settings import Settings


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo", help="run the end-to-end job on the local stack and print what happened"
    )
    parser.add_argument("--requests", type=int, default=2000, help="how many requests to send")
    parser.set_defaults(handler=run_demo_command)


def run_demo_command(args: argparse.Namespace, settings: Settings) -> int:
    # The demo lives with the workers; importing it lazily keeps `sluiceway --help` fast.
    from workers.demo import render_report, run_demo

    report = run_demo(settings, count=args.requests)
    print()
    print(render_report(report))
    return 0 if report.ok else 1
