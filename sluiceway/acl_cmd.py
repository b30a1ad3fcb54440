"""``sluiceway acl plan|apply``: least-privilege Kafka ACLs derived from the settings.

Which models a connector serves comes from ``--connector NAME=MODEL[,MODEL...]`` flags; with
``--local-stack``, from the local stack's ``stack.kafka_connectors`` unless flags replace it
whole. ``apply`` with ``--local-stack`` against the secured local stack (``stack.secured``)
runs as the stack's ``admin`` and also creates the principals' SCRAM users; otherwise it runs
with the ``kafka`` settings, which must then be an administrator's (users are the identity
provider's business there).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from pipeline.kafka import acl_admin, acls
from pipeline.settings import Settings
from schemas.errors import SluicewayError


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "acl", help="least-privilege Kafka ACLs for every principal (plan, apply)"
    )
    actions = parser.add_subparsers(dest="acl_action", required=True, metavar="ACTION")
    plan_parser = actions.add_parser("plan", help="print the ACLs the settings call for")
    apply_parser = actions.add_parser(
        "apply", help="create missing ACLs (idempotent); report stale ones of our principals"
    )
    apply_parser.add_argument(
        "--prune", action="store_true", help="also delete the stale bindings of our principals"
    )
    for sub in (plan_parser, apply_parser):
        sub.add_argument(
            "--connector",
            action="append",
            default=None,
            metavar="NAME=MODEL[,MODEL]",
            help="a connector and the models it serves (repeatable; replaces "
            "stack.kafka_connectors)",
        )
        sub.add_argument(
            "--local-stack",
            action="store_true",
            help="the local stack's settings: its connectors and demo models, and on the "
            "secured stack, apply as its admin (creating SCRAM users)",
        )
    parser.set_defaults(handler=run_acl)


def parse_connectors(
    values: list[str] | None, defaults: Mapping[str, tuple[str, ...]]
) -> dict[str, tuple[str, ...]]:
    if values is None:
        return dict(defaults)
    connectors: dict[str, tuple[str, ...]] = {}
    for value in values:
        name, separator, models = value.partition("=")
        served = tuple(model for model in models.split(",") if model)
        if not separator or not name or not served:
            raise SluicewayError(f"--connector {value!r}: expected NAME=MODEL[,MODEL...]")
        if name in connectors:
            raise SluicewayError(f"--connector {name!r} given twice")
        connectors[name] = served
    return connectors


def run_acl(args: argparse.Namespace, settings: Settings) -> int:
    local = None
    if args.local_stack:
        from devkit.settings import LocalSettings

        assert isinstance(settings, LocalSettings)  # what main() loads for --local-stack
        local = settings
    connectors = parse_connectors(
        args.connector, {} if local is None else local.stack.kafka_connectors
    )
    grants = acls.plan(settings, connectors)
    if args.acl_action == "plan":
        for grant in grants:
            print(grant.line())
        print(f"{len(grants)} ACLs for {len(acls.principals(settings, connectors))} principals")
        return 0
    if local is not None and local.stack.secured:
        from devkit.stack.kafka_security import apply_stack_acls

        report = apply_stack_acls(local, connectors, prune=args.prune)
    else:
        report = acl_admin.apply(
            settings.kafka, grants, prune=args.prune, namespace=settings.namespace
        )
    for created in report.created:
        print(f"created  {created}")
    for stale in report.stale:
        verb = "removed " if args.prune else "stale   "
        print(f"{verb} {stale}")
    for user in report.users_created:
        print(f"user     {user} (SCRAM-SHA-512)")
    print(
        f"{len(report.created)} created, {report.unchanged} in place, {len(report.stale)} stale"
        + ("" if args.prune or not report.stale else " (--prune removes them)")
    )
    return 0
