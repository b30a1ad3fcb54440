"""Scoped object-store credentials: each principal's policy reaches exactly the keys its code
writes, and no name in the settings can widen it."""

from __future__ import annotations

import fnmatch
from datetime import UTC, datetime
from typing import Any

import pytest

from devkit.settings import load_demo_settings
from pipeline.batchjobs.store import JobStore
from pipeline.settings import ModelSettings, Settings, load_settings
from pipeline.storage.policies import (
    BATCH_PRINCIPAL,
    MONITOR_PRINCIPAL,
    Grant,
    GrantRefused,
    plan_grants,
    worker_principal,
)
from pipeline.storage.segments import segment_key
from workers.inference.contracts import dead_letter_offload_key
from workers.monitor.references import reference_key

BUCKET = "sluiceway-results"
AT = datetime(2026, 3, 1, tzinfo=UTC)


def allows(grant: Grant, action: str, key: str, *, bucket: str = BUCKET) -> bool:
    """Evaluate the policy as MinIO does for an object ARN: ``*`` is any run of characters,
    ``?`` one character (the names in play hold no ``[``, so fnmatch's sets never apply)."""
    resource = f"arn:aws:s3:::{bucket}/{key}"
    for statement in grant.policy["Statement"]:
        assert statement["Effect"] == "Allow"  # no Deny needed: everything not allowed is denied
        if action in statement["Action"] and any(
            fnmatch.fnmatchcase(resource, pattern) for pattern in statement["Resource"]
        ):
            return True
    return False


def grants_by_principal(settings: Settings) -> dict[str, Grant]:
    return {grant.principal: grant for grant in plan_grants(settings)}


def with_models(*names: str, **overrides: Any) -> Settings:
    return load_settings(models={name: ModelSettings() for name in names}, **overrides)


def test_one_worker_per_model_plus_batch_runner_and_monitor() -> None:
    grants = grants_by_principal(load_demo_settings())
    assert sorted(grants) == sorted(
        [
            worker_principal("scaler"),
            worker_principal("invoice_risk"),
            worker_principal("case_summary"),
            BATCH_PRINCIPAL,
            MONITOR_PRINCIPAL,
        ]
    )
    assert grants[worker_principal("scaler")].writable_prefixes() == [
        "scaler/",
        "dead-letters/inference.scaler.requests/",
        "dead-letters/inference.scaler.batch/",
    ]


def test_worker_writes_its_segments_and_dead_letters_and_reads_nothing() -> None:
    settings = with_models("a", "ab")
    worker = grants_by_principal(settings)[worker_principal("a")]
    # Keys exactly as the worker's own code builds them, hostile versions included.
    for version in ("1", "../../ab", "..", "a/../../ab", "*", "%2E%2E"):
        key = segment_key("a", version, ["r1", "r2"], AT)
        assert allows(worker, "s3:PutObject", key), key
    for topic in ("inference.a.requests", "inference.a.batch"):
        assert allows(worker, "s3:PutObject", dead_letter_offload_key(topic, 0, 42))
    assert not allows(worker, "s3:GetObject", segment_key("a", "1", ["r"], AT))


def test_model_a_cannot_write_model_ab_or_any_shared_folder() -> None:
    settings = with_models("a", "ab")
    worker = grants_by_principal(settings)[worker_principal("a")]
    outside = [
        segment_key("ab", "1", ["r"], AT),
        "ab/anything",
        "a",  # the folder name itself is no object of the model's
        "a.jsonl",
        "b/a/1/x.jsonl",
        dead_letter_offload_key("inference.ab.requests", 0, 1),
        dead_letter_offload_key("inference.a.results", 0, 1),
        "dead-letters/inference.a.requests",
        reference_key("a"),
        "reports/a/2026/03/01/r.html",
        JobStore(settings).key("job-1", "manifest.json"),
    ]
    for key in outside:
        assert not allows(worker, "s3:PutObject", key), key


def test_batch_runner_owns_the_batch_folder_only() -> None:
    settings = with_models("a", batch={"prefix": "jobs"})
    batch = grants_by_principal(settings)[BATCH_PRINCIPAL]
    key = JobStore(settings).key("job-1", "results.jsonl")
    assert key.startswith("jobs/")
    assert allows(batch, "s3:PutObject", key)
    assert allows(batch, "s3:GetObject", key)
    for other in (segment_key("a", "1", ["r"], AT), "jobsx/j/manifest.json", "reports/a/x"):
        assert not allows(batch, "s3:PutObject", other), other
        assert not allows(batch, "s3:GetObject", other), other
    (listing,) = [s for s in batch.policy["Statement"] if "s3:ListBucket" in s["Action"]]
    assert listing["Resource"] == [f"arn:aws:s3:::{BUCKET}"]
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["jobs/", "jobs/*"]}}


def test_monitor_reads_references_writes_reports_and_never_touches_segments() -> None:
    settings = with_models("a", "ab")
    monitor = grants_by_principal(settings)[MONITOR_PRINCIPAL]
    assert allows(monitor, "s3:GetObject", reference_key("a"))
    assert allows(monitor, "s3:PutObject", reference_key("ab"))
    assert allows(monitor, "s3:PutObject", "reports/a/2026/03/01/r.html")
    assert not allows(monitor, "s3:PutObject", "reports/x/2026/03/01/r.html")
    for key in (segment_key("a", "1", ["r"], AT), "dead-letters/inference.a.requests/0/1.bin"):
        assert not allows(monitor, "s3:PutObject", key)
        assert not allows(monitor, "s3:GetObject", key)


def test_no_principal_may_list_or_administer_beyond_its_grant() -> None:
    for grant in plan_grants(load_demo_settings()):
        actions = {action for s in grant.policy["Statement"] for action in s["Action"]}
        assert actions <= {
            "s3:HeadBucket",
            "s3:GetObject",
            "s3:PutObject",
            "s3:AbortMultipartUpload",
            "s3:ListBucket",
        }, grant.principal
        assert not any("*" in action for action in actions)
        if grant.role != "batch":
            assert "s3:ListBucket" not in actions


@pytest.mark.parametrize(
    "model",
    ["a*", "a?", "*", "${aws:username}", ".", "..", "a/b", "a\n", "a b", "ä", "a,b", "a=b"],
)
def test_model_names_that_could_widen_a_grant_are_refused(model: str) -> None:
    with pytest.raises(GrantRefused, match="cannot be scoped"):
        plan_grants(with_models(model))


@pytest.mark.parametrize("model", ["reports", "references", "dead-letters", "batch"])
def test_a_model_named_like_a_shared_folder_is_refused(model: str) -> None:
    with pytest.raises(GrantRefused, match=f"shared object-store folder {model}/"):
        plan_grants(with_models(model))


def test_a_model_named_like_a_moved_batch_prefix_is_refused_and_the_default_name_is_free() -> None:
    with pytest.raises(GrantRefused, match=r"batch\.prefix"):
        plan_grants(with_models("jobs", batch={"prefix": "jobs"}))
    assert worker_principal("batch") in grants_by_principal(
        with_models("batch", batch={"prefix": "jobs"})
    )


@pytest.mark.parametrize("bucket", ["Results", "r*", "a", "results/x", "bucket?", "-bucket"])
def test_bucket_names_that_are_not_plain_are_refused(bucket: str) -> None:
    with pytest.raises(GrantRefused, match=r"object_store\.bucket"):
        plan_grants(load_demo_settings(object_store={"bucket": bucket}))


def test_no_models_still_plans_valid_documents() -> None:
    grants = grants_by_principal(load_settings(models={}))
    assert sorted(grants) == [BATCH_PRINCIPAL, MONITOR_PRINCIPAL]
    for grant in grants.values():
        assert all(statement["Resource"] for statement in grant.policy["Statement"])
