"""Tenants, limits, pagination and idempotency of ``sluiceway api``: pure rules."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from pipeline.settings import ApiSettings, TenantSettings
from schemas.models import BatchCounts, BatchInputFormat, BatchJob, BatchJobStatus
from workers.api.idempotency import fingerprint, key_digest, replayed_batch
from workers.api.openai_format import ApiError
from workers.api.paging import page, page_request
from workers.api.tenants import KeyRing, check_enqueued, check_file_size, enqueued_records

KEY_A = "sk-a-" + "1" * 20
KEY_B = "sk-b-" + "2" * 20


def ring() -> KeyRing:
    return KeyRing(
        {
            "acme": TenantSettings(api_keys=(SecretStr(KEY_A),), max_enqueued_records=10),
            "globex": TenantSettings(api_keys=(SecretStr(KEY_B),), max_file_bytes=2048),
        }
    )


# ------------------------------------------------------------------------------ keys


def test_a_bearer_key_names_its_tenant() -> None:
    assert ring().tenant(f"Bearer {KEY_A}").name == "acme"
    assert ring().tenant(f"bearer {KEY_B}").name == "globex"


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_api_key"),
        ("", "missing_api_key"),
        ("Bearer", "invalid_api_key"),
        ("Bearer ", "invalid_api_key"),
        (f"Basic {KEY_A}", "invalid_api_key"),
        (KEY_A, "invalid_api_key"),
        (f"Bearer {KEY_A}x", "invalid_api_key"),
        ("Bearer " + "k" * 10_000, "invalid_api_key"),
        ("Bearer \udcff", "invalid_api_key"),
    ],
)
def test_missing_or_wrong_keys_are_401(header: str | None, code: str) -> None:
    with pytest.raises(ApiError) as refused:
        ring().tenant(header)
    assert (refused.value.status, refused.value.code) == (401, code)


@pytest.mark.parametrize(
    "tenants",
    [
        {"../x": {"api_keys": ["k" * 20]}},
        {"a/b": {"api_keys": ["k" * 20]}},
        {"acme": {"api_keys": ["short"]}},
        {"a": {"api_keys": ["k" * 20]}, "b": {"api_keys": ["k" * 20]}},
    ],
)
def test_settings_refuse_unsafe_tenant_names_short_or_shared_keys(tenants: Any) -> None:
    with pytest.raises(ValidationError):
        ApiSettings(tenants=tenants)


# ---------------------------------------------------------------------------- limits


def _job(total: int, done: int, status: BatchJobStatus) -> BatchJob:
    return BatchJob(
        job_id="job-20261201-0123456789ab",
        model="invoice_risk",
        status=status,
        input_uri="s3://b/k",
        input_format=BatchInputFormat.JSONL,
        created_at=datetime(2026, 12, 1, tzinfo=UTC),
        counts=BatchCounts(total=total, completed=done),
    )


def test_enqueued_records_count_unanswered_records_of_unfinished_batches() -> None:
    jobs = [
        _job(5, 0, BatchJobStatus.VALIDATING),
        _job(8, 6, BatchJobStatus.IN_PROGRESS),
        _job(100, 10, BatchJobStatus.CANCELLED),
    ]
    assert enqueued_records(jobs) == 7


def test_a_batch_beyond_the_enqueued_limit_is_429() -> None:
    acme = ring().tenant(f"Bearer {KEY_A}")
    check_enqueued(acme, 7, 3)  # exactly at the limit is fine
    with pytest.raises(ApiError) as refused:
        check_enqueued(acme, 7, 4)
    assert (refused.value.status, refused.value.code) == (429, "enqueued_records_limit_exceeded")


def test_a_file_beyond_the_tenant_size_limit_is_429() -> None:
    globex = ring().tenant(f"Bearer {KEY_B}")
    check_file_size(globex, 2048)
    with pytest.raises(ApiError) as refused:
        check_file_size(globex, 2049)
    assert (refused.value.status, refused.value.code) == (429, "file_size_limit_exceeded")


# ---------------------------------------------------------------------------- paging


ITEMS = [f"id-{n}" for n in range(7, 0, -1)]  # newest first


def test_pages_follow_the_cursor_until_has_more_ends() -> None:
    seen: list[str] = []
    after: str | None = None
    while True:
        query = {"limit": "3", **({"after": after} if after else {})}
        found = page(ITEMS, page_request(query, orderable=False), str)
        seen.extend(found.items)
        if not found.has_more:
            break
        after = found.items[-1]
    assert seen == ITEMS


def test_ascending_order_where_the_list_allows_it() -> None:
    found = page(ITEMS, page_request({"order": "asc", "limit": "2"}, orderable=True), str)
    assert found.items == ["id-1", "id-2"]
    assert found.has_more


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "0"},
        {"limit": "101"},
        {"limit": "-1"},
        {"limit": "1e3"},
        {"limit": "٣"},  # a digit, but not an ASCII one
        {"limit": "9" * 50},
        {"order": "sideways"},
        {"order": "asc"},  # batches list newest first only
        {"after": ""},
        {"after": "x" * 1000},
    ],
)
def test_bad_pagination_parameters_are_400(query: dict[str, str]) -> None:
    with pytest.raises(ApiError) as refused:
        page_request(query, orderable=False)
    assert refused.value.status == 400


def test_a_cursor_that_names_no_item_is_400() -> None:
    with pytest.raises(ApiError) as refused:
        page(ITEMS, page_request({"after": "id-99"}, orderable=False), str)
    assert refused.value.param == "after"


# ----------------------------------------------------------------------- idempotency


def test_a_replayed_key_returns_the_remembered_batch() -> None:
    request = {"input_file_id": "file-1", "endpoint": "/v1/predictions"}
    remembered = {"batch_id": "job-1", "fingerprint": fingerprint(request)}
    assert replayed_batch(None, fingerprint(request)) is None
    assert replayed_batch(remembered, fingerprint(dict(reversed(request.items())))) == "job-1"


def test_a_key_reused_with_other_parameters_is_400() -> None:
    remembered = {"batch_id": "job-1", "fingerprint": fingerprint({"a": 1})}
    with pytest.raises(ApiError) as refused:
        replayed_batch(remembered, fingerprint({"a": 2}))
    assert refused.value.code == "idempotency_key_reused"


@pytest.mark.parametrize("key", ["", "k" * 256, "caf\u00e9", "a\nb", "../../x\x00"])
def test_bad_idempotency_keys_are_400(key: str) -> None:
    with pytest.raises(ApiError):
        key_digest(key)


def test_a_key_is_stored_under_its_digest_never_its_text() -> None:
    digest = key_digest("../../etc/passwd")
    assert len(digest) == 64
    assert set(digest) <= set("0123456789abcdef")
