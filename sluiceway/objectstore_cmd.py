"""``sluiceway objectstore plan|grant``: least-privilege object-store credentials.

``plan`` prints, without touching the store, the MinIO policy each principal gets (derived
from the settings: one worker per model, the batch runner, the monitor). ``grant`` applies it
with the configured (admin) credential: the bucket with default encryption, then a user and
policy per principal, each credential written to ``<principal>.env`` (mode 0600). The secured
local stack does the same at ``stack up``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.settings import Settings


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "objectstore", help="scoped object-store credentials: plan or grant their policies"
    )
    actions = parser.add_subparsers(dest="objectstore_action", required=True, metavar="ACTION")
    plan = actions.add_parser("plan", help="print each principal's policy (JSON), change nothing")
    plan.set_defaults(handler=plan_command)
    grant = actions.add_parser(
        "grant", help="encrypt the bucket by default and create the scoped users and policies"
    )
    grant.add_argument(
        "--credentials-dir",
        type=Path,
        default=None,
        help="where <principal>.env files go (default: <stack.state_dir>/secrets/objectstore)",
    )
    grant.set_defaults(handler=grant_command)


def plan_command(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.storage.policies import plan_grants

    plan = [
        {
            "principal": grant.principal,
            "role": grant.role,
            "writes": grant.writable_prefixes(),
            "policy": grant.policy,
        }
        for grant in plan_grants(settings)
    ]
    print(json.dumps(plan, indent=2))
    return 0


def grant_command(args: argparse.Namespace, settings: Settings) -> int:
    from devkit.settings import load_local_settings
    from devkit.stack.services import MinioService
    from pipeline.storage.client import ensure_encrypted_bucket, make_client
    from pipeline.storage.grants import apply_grants
    from pipeline.storage.policies import plan_grants

    grants = plan_grants(settings)
    # The default folder is the local stack's; a deployment names its own.
    folder: Path = (
        args.credentials_dir or MinioService(load_local_settings(args.config)).credentials_dir
    )
    store = settings.object_store
    ensure_encrypted_bucket(make_client(store), store.bucket)
    files = apply_grants(store, grants, folder)
    for grant, path in zip(grants, files, strict=True):
        print(f"{grant.principal:<32} {grant.role:<8} {path}")
    print(f"bucket {store.bucket}: encrypted by default (SSE-S3)")
    return 0
