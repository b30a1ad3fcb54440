"""``sluiceway worker --model NAME [--processes N]``: serve one or more models until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
from pathlib import Path
from typing import Any

from pipeline.settings import Settings, check_models_defined


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "worker", help="run the inference worker for one or more models"
    )
    parser.add_argument("--model", action="append", required=True, help="repeat for more models")
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help="worker processes under one supervisor (default: workers.processes, else one "
        "per core); 1 runs the worker in this process",
    )
    parser.add_argument("--log-level", default="INFO")
    # Set by the supervisor for its children only.
    parser.add_argument("--supervisor-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--slot", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stats-file", type=Path, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(handler=run_worker_command)


def process_count(requested: int | None, settings: Settings) -> int:
    count = requested or settings.workers.processes or os.cpu_count() or 1
    if count < 1:
        raise SystemExit("--processes must be at least 1")
    return count


def run_worker_command(args: argparse.Namespace, settings: Settings) -> int:
    from workers.inference.runner import configure_logging

    configure_logging(args.log_level)
    check_models_defined(settings, args.model)
    count = process_count(args.processes, settings)
    if count > 1:
        return _supervise(args, settings, count)
    return _serve_here(args, settings)


def _serve_here(args: argparse.Namespace, settings: Settings) -> int:
    from workers.inference.runner import run_worker

    supervised = args.supervisor_pid is not None
    if supervised:
        from workers.supervisor import die_with_parent

        die_with_parent(args.supervisor_pid)
        settings = child_settings(settings, args.supervisor_pid, args.slot)
    stats = asyncio.run(run_worker(settings, args.model, serve_metrics=not supervised))
    counters = {
        name: value
        for name, value in dataclasses.asdict(stats).items()
        if isinstance(value, int) and not isinstance(value, bool)
    }
    if args.stats_file is not None:
        args.stats_file.write_text(json.dumps(counters))
    print(stopped_line(counters), flush=True)
    return 0


def child_settings(settings: Settings, supervisor_pid: int, slot: int) -> Settings:
    """A supervised child's settings: ids of its own, stable per slot.

    A restarted child takes over its predecessor's transactional id (exactly-once mode fences
    the one that died) and, with static membership, its group instance id; no two children
    share either, as two members with one instance id would fence each other.
    """
    base = settings.workers.worker_id or f"{socket.gethostname()}-{supervisor_pid}"
    ids: dict[str, str] = {"worker_id": f"{base}-{slot}"}
    if settings.workers.group_instance_id:
        ids["group_instance_id"] = f"{settings.workers.group_instance_id}-{slot}"
    return settings.model_copy(update={"workers": settings.workers.model_copy(update=ids)})


def _supervise(args: argparse.Namespace, settings: Settings, count: int) -> int:
    from workers.inference.runner import prepare_topics_and_bucket
    from workers.supervisor import child_arguments, run_supervisor

    # Once here, so the children do not race to create the same topics and bucket.
    prepare_topics_and_bucket(settings, args.model)

    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEWAY_")}
    environment.update(settings.as_environment())
    status, counters = run_supervisor(
        lambda slot, stats_file: child_arguments(args.model, args.log_level, slot, stats_file),
        count,
        environment=environment,
        metrics_port=settings.workers.metrics_port,
        metrics_address=settings.workers.metrics_address,
        drain_timeout_s=settings.workers.drain_timeout_s,
    )
    print(stopped_line(counters) + f" processes={count}", flush=True)
    return status


def stopped_line(counters: dict[str, int]) -> str:
    names = ("consumed", "results", "batches", "dead_lettered", "expired", "commits")
    return "worker stopped: " + " ".join(f"{name}={counters.get(name, 0)}" for name in names)
