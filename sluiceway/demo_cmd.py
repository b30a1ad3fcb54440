"""``sluiceway demo``: one real round trip on the running stack, summarised."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from devkit.settings import LocalSettings

if TYPE_CHECKING:
    from workers.processes import Principals as PrincipalsType


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo", help="run the end-to-end job on the local stack and print what happened"
    )
    parser.add_argument("--requests", type=int, default=5000, help="how many SAP invoices to score")
    parser.add_argument(
        "--cases", type=int, default=200, help="how many Salesforce cases to summarise"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=500.0,
        help="requests per second the simulated feeds offer (0: as fast as possible, to see "
        "the saturated throughput)",
    )
    parser.add_argument(
        "--monitor-window-s",
        type=float,
        default=3.0,
        help="monitor window length for the rollback story (production default: 30 s)",
    )
    parser.add_argument(
        "--no-rollback",
        action="store_true",
        help="skip the second part (v2 promoted and rolled back by the monitor)",
    )
    parser.add_argument(
        "--vllm-url",
        default=None,
        help="a real vLLM server's /v1 URL for the case route (default: the protocol test "
        "server from tests/, started for the run)",
    )
    parser.set_defaults(handler=run_demo_command, local_stack=True)


def run_demo_command(args: argparse.Namespace, settings: LocalSettings) -> int:
    # The demo lives with the workers; importing it lazily keeps `sluiceway --help` fast.
    from devkit.demo.run import render_report, run_demo

    principals = None
    if settings.stack.secured:
        settings, principals = _secured_local_stack(settings)
    report = run_demo(
        settings,
        count=args.requests,
        cases=args.cases,
        rate=args.rate,
        vllm_url=args.vllm_url,
        rollback_window_s=None if args.no_rollback else args.monitor_window_s,
        principals=principals,
    )
    print()
    print(render_report(report))
    return 0 if report.ok else 1


def _secured_local_stack(settings: LocalSettings) -> tuple[LocalSettings, PrincipalsType]:
    """On the secured local stack every process of the demo signs in as its own principal
    (SCRAM over TLS; the stack's ``admin`` for the operator's actions) and reaches MinIO over
    https trusting the stack's CA."""
    from devkit.demo.run import MODEL, TEXT_MODEL
    from devkit.stack.kafka_security import admin_kafka_settings, principal_kafka_settings
    from devkit.stack.services import MinioService
    from pipeline.principals import CLIENT, MONITOR, worker_principal
    from workers.processes import Principals

    admin = admin_kafka_settings(settings)
    settings = settings.model_copy(
        update={"kafka": admin, "object_store": MinioService(settings).client_settings()}
    )
    principals = Principals(
        operator=admin,
        client=principal_kafka_settings(settings, CLIENT),
        monitor=principal_kafka_settings(settings, MONITOR),
        workers={
            model: principal_kafka_settings(settings, worker_principal(model))
            for model in (MODEL, TEXT_MODEL)
        },
    )
    return settings, principals
