"""``sluiceway topics create | describe``: a model's topics, with their layout and retention."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.settings import Settings


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "topics", help="create a model's topics, or describe the namespace's topics"
    )
    actions = parser.add_subparsers(dest="topics_action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        help="requests, batch, results, DLQ, feedback and invalidations of a model, "
        "plus control/drift",
    )
    create.add_argument("--model", action="append", required=True, help="repeat for more")
    create.add_argument("--partitions", type=int, default=3)
    create.set_defaults(handler=create_command)
    describe = actions.add_parser("describe", help="partitions, replication, cleanup, retention")
    describe.set_defaults(handler=describe_command)


def create_command(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.kafka.admin import (
        batch_progress_topic_spec,
        control_topic_spec,
        ensure_topics,
        invalidation_topic_spec,
        model_topic_specs,
        monitor_topic_specs,
    )
    from pipeline.topics import ModelTopics

    specs = [control_topic_spec(settings.namespace), batch_progress_topic_spec(settings.namespace)]
    for model in args.model:
        topics = ModelTopics(settings.namespace, model)
        specs += model_topic_specs(topics, args.partitions)
        specs += monitor_topic_specs(settings.namespace, topics)
        specs.append(invalidation_topic_spec(topics))
    unique = {spec.name: spec for spec in specs}
    created = set(ensure_topics(settings.kafka, unique.values()))
    for name in sorted(unique):
        print(f"{'created' if name in created else 'exists '}  {name}")
    return 0


def describe_command(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.kafka.admin import describe_topics

    rows = describe_topics(settings.kafka, f"{settings.namespace}.")
    if not rows:
        print(f"no topics under {settings.namespace}.")
        return 0
    width = max(len(row.name) for row in rows)
    print(f"{'TOPIC':<{width}}  PARTITIONS  REPLICAS  CLEANUP  RETENTION")
    for row in rows:
        retention = "forever" if row.retention_ms == "-1" else _duration(int(row.retention_ms))
        print(
            f"{row.name:<{width}}  {row.partitions:>10}  {row.replication_factor:>8}  "
            f"{row.cleanup_policy:<7}  {retention}"
        )
    return 0


def _duration(ms: int) -> str:
    hours = ms / 3_600_000
    return f"{hours / 24:g} d" if hours >= 24 else f"{hours:g} h"
