"""``sluiceway model train``: train the demo model's two versions into the Triton repository."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from devkit.modeling.training import DEMO_MODEL, train_versions
from devkit.settings import LocalSettings
from devkit.stack.services import resolve


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "model", help="train the demo model (invoice payment risk) in two versions"
    )
    actions = parser.add_subparsers(dest="model_action", required=True, metavar="ACTION")
    train = actions.add_parser(
        "train", help="generate data, train v1 (reference) and v2 (after a unit change)"
    )
    train.add_argument("--seed", type=int, default=7)
    train.add_argument("--rows", type=int, default=50_000, help="training rows per version")
    train.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"model folder (default: <stack.model_repository>/{DEMO_MODEL})",
    )
    train.set_defaults(handler=train_command, local_stack=True)


def train_command(args: argparse.Namespace, settings: LocalSettings) -> int:
    out = args.out or resolve(settings.stack.model_repository) / DEMO_MODEL
    metrics = train_versions(out, seed=args.seed, n=args.rows)
    print(f"trained {DEMO_MODEL} into {out} (seed {args.seed}, {args.rows} rows per version)")
    print(
        f"{'version':<9}{'AUC':>7}{'log-loss':>10}{'ECE':>7}{'mean risk':>11}{'observed':>10}"
        "   on reference invoices"
    )
    for version, figures in sorted(metrics.items()):
        print(
            f"{version:<9}{figures['auc']:>7.3f}{figures['log_loss']:>10.3f}"
            f"{figures['ece']:>7.3f}{figures['mean_predicted']:>11.3f}"
            f"{figures['observed_rate']:>10.3f}"
        )
    print(f"weights and metrics.json in {out}/<version>/; Triton loads them when it starts")
    return 0
