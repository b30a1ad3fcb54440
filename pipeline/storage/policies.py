"""Least-privilege object-store credentials, derived from the settings (pure: no I/O).

Every process that writes to the bucket gets its own MinIO user whose policy names exactly
the folders it writes, taken from the same code that builds the object keys:

- ``worker-<model>``: writes the model's result segments (``<model>/...``, see
  :func:`~pipeline.storage.segments.segment_key`) and the originals of its dead letters
  (``dead-letters/<requests or batch topic>/...``); it reads nothing.
- ``batch``: the batch runner and ``batch submit|status|results``: reads, writes and
  lists the batch jobs' folder (``<batch.prefix>/...``) only.
- ``monitor``: reads and publishes each model's reference sample
  (``references/<model>/...``) and writes drift reports (``reports/<model>/...``).

Every folder ends in ``/`` in the policy, so model ``a`` cannot write ``ab/...``. Names that
would widen a grant are refused, not escaped: a model or folder whose name holds a wildcard
(``*``, ``?``), a policy variable (``${...}``) or a path step (``.``, ``..``), and a model
named like one of the shared folders (``reports``, the batch prefix...), whose worker would
otherwise write every model's reports or jobs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pipeline import principals
from pipeline.settings import Settings
from pipeline.storage.segments import path_segment
from pipeline.topics import ModelTopics
from schemas.errors import SluicewayError

POLICY_VERSION = "2012-10-17"
DEAD_LETTERS_FOLDER = "dead-letters"
"""Must match ``workers.inference.contracts.dead_letter_offload_key``."""
REPORTS_FOLDER = "reports"
"""Must match where ``workers.monitor.app`` writes drift reports."""
REFERENCES_FOLDER = "references"
"""Must match ``workers.monitor.references.reference_key``."""

_NAME = re.compile(r"[A-Za-z0-9._-]+")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

Role = Literal["worker", "batch", "monitor"]


class GrantRefused(SluicewayError):
    """A name in the settings would make a credential reach further than its own folder."""


@dataclass(frozen=True)
class Grant:
    """One MinIO user and the policy (same name) attached to it."""

    principal: str
    role: Role
    policy: dict[str, Any]

    def writable_prefixes(self) -> list[str]:
        """Object-key prefixes this principal may write (for display and tests)."""
        return [
            resource.split("/", 1)[1].removesuffix("*")
            for statement in self.policy["Statement"]
            if "s3:PutObject" in statement["Action"]
            for resource in statement["Resource"]
        ]


def worker_principal(model: str) -> str:
    return principals.worker_principal(_checked_name(model, "model"))


BATCH_PRINCIPAL = principals.BATCH
MONITOR_PRINCIPAL = principals.MONITOR


def plan_grants(settings: Settings) -> list[Grant]:
    """Every credential the deployment needs: one per model's worker, the batch runner and the
    monitor. Raises :class:`GrantRefused` naming the setting when a name would widen one."""
    bucket = _checked_bucket(settings.object_store.bucket)
    batch_prefix = _checked_name(settings.batch.prefix, "batch.prefix")
    shared = {DEAD_LETTERS_FOLDER, REPORTS_FOLDER, REFERENCES_FOLDER, batch_prefix}
    models = sorted(settings.models)
    for model in models:
        _checked_name(model, "model")
        if model in shared:
            raise GrantRefused(
                f"model {model!r} is named like the shared object-store folder {model}/: its "
                "worker's credential would write that folder; rename the model"
                + (" or set batch.prefix" if model == batch_prefix else "")
            )
    grants = [_worker_grant(settings, bucket, model) for model in models]
    grants.append(_batch_grant(bucket, batch_prefix))
    grants.append(_monitor_grant(bucket, models))
    return grants


def _worker_grant(settings: Settings, bucket: str, model: str) -> Grant:
    topics = ModelTopics(settings.namespace, model)
    prefixes = [
        f"{path_segment(model)}/",
        f"{DEAD_LETTERS_FOLDER}/{path_segment(topics.requests)}/",
        f"{DEAD_LETTERS_FOLDER}/{path_segment(topics.batch)}/",
    ]
    statements = [_see_bucket(bucket), _write(bucket, prefixes)]
    return Grant(worker_principal(model), "worker", _document(statements))


def _batch_grant(bucket: str, prefix: str) -> Grant:
    folder = f"{prefix}/"
    statements = [
        _see_bucket(bucket),
        {
            "Effect": "Allow",
            "Action": ["s3:ListBucket"],
            "Resource": [f"arn:aws:s3:::{bucket}"],
            # Listing only inside the folder: `batch list` finds jobs by their sub-folders.
            "Condition": {"StringLike": {"s3:prefix": [folder, f"{folder}*"]}},
        },
        _read(bucket, [folder]),
        _write(bucket, [folder]),
    ]
    return Grant(BATCH_PRINCIPAL, "batch", _document(statements))


def _monitor_grant(bucket: str, models: list[str]) -> Grant:
    references = [f"{REFERENCES_FOLDER}/{model}/" for model in models]
    reports = [f"{REPORTS_FOLDER}/{model}/" for model in models]
    statements = [_see_bucket(bucket)]
    if models:
        # The monitor publishes a model's reference sample when the store has none yet.
        statements += [_read(bucket, references), _write(bucket, [*references, *reports])]
    return Grant(MONITOR_PRINCIPAL, "monitor", _document(statements))


def _see_bucket(bucket: str) -> dict[str, Any]:
    # HEAD bucket (ensure_bucket at start-up) without listing anyone's object names.
    return {"Effect": "Allow", "Action": ["s3:HeadBucket"], "Resource": [f"arn:aws:s3:::{bucket}"]}


def _read(bucket: str, prefixes: list[str]) -> dict[str, Any]:
    return {
        "Effect": "Allow",
        "Action": ["s3:GetObject"],
        "Resource": [f"arn:aws:s3:::{bucket}/{prefix}*" for prefix in prefixes],
    }


def _write(bucket: str, prefixes: list[str]) -> dict[str, Any]:
    return {
        "Effect": "Allow",
        # Large objects go up in parts; an abandoned upload must be abortable by its writer.
        "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
        "Resource": [f"arn:aws:s3:::{bucket}/{prefix}*" for prefix in prefixes],
    }


def _document(statements: list[dict[str, Any]]) -> dict[str, Any]:
    return {"Version": POLICY_VERSION, "Statement": statements}


def _checked_name(name: str, setting: str) -> str:
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise GrantRefused(
            f"{setting} {name!r} cannot be scoped in an object-store policy: use letters, "
            "digits, '.', '_' and '-' only (and not '.' or '..')"
        )
    return name


def _checked_bucket(bucket: str) -> str:
    if not _BUCKET.fullmatch(bucket):
        raise GrantRefused(
            f"object_store.bucket {bucket!r} is not a plain S3 bucket name "
            "(3-63 of a-z, 0-9, '.', '-'): it cannot be named in a policy safely"
        )
    return bucket
