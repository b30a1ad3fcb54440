"""The batch runner counts only outcomes of the request ids it made: keyed ids, the checkpoint
that keeps the key, and the matching of results and dead letters (fake messages, no Kafka)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import schemas
from pipeline.settings import Settings
from pipeline.topics import ModelTopics
from schemas.models import (
    BatchInputFormat,
    BatchJob,
    BatchJobStatus,
    DeadLetter,
    InferenceRequest,
    InferenceResult,
    Inputs,
    Outputs,
    ResultStatus,
    Tensor,
    TensorDatatype,
)
from tests.unit.fakes import FakeMessage
from workers.batch.runner import (
    Checkpoint,
    JobRunner,
    _JobRun,
    message_key,
    new_job_key,
    request_id,
)

JOB = "job-1"
KEY = "ab" * 32
MODEL = "invoice_risk"
T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_request_ids_are_keyed_deterministic_and_unguessable_without_the_key() -> None:
    first = request_id(JOB, "c-1", KEY)
    assert first == request_id(JOB, "c-1", KEY), "a restarted runner makes the same id"
    assert first != request_id(JOB, "c-2", KEY)
    assert first != request_id("job-2", "c-1", KEY)
    assert first != request_id(JOB, "c-1", "cd" * 32)
    # Not the public derivation anybody could compute from the job and custom id.
    assert first != request_id(JOB, "c-1", None)
    assert request_id(JOB, "c-1", None) == request_id(JOB, "c-1", None)
    # Custom ids of any characters (they come from the submitted file).
    for custom in ("", "/", "ü" * 256, "a/b/c", "\x00"):
        assert isinstance(request_id(JOB, custom, KEY), uuid.UUID)


def test_job_keys_are_random_and_256_bits() -> None:
    keys = {new_job_key() for _ in range(20)}
    assert len(keys) == 20
    assert all(len(bytes.fromhex(key)) == 32 for key in keys)


def test_the_checkpoint_carries_the_job_key_and_reads_old_checkpoints() -> None:
    checkpoint = Checkpoint(10, {0: 5}, {0: 1}, KEY)
    assert Checkpoint.decode(checkpoint.encode()) == checkpoint
    old = json.dumps({"published": 3, "results_from": {"0": 2}, "dead_letters_from": {}})
    assert Checkpoint.decode(old.encode()) == Checkpoint(3, {0: 2}, {}, None)


# ---------------------------------------------------------------------- matching outcomes


class _Consumer:
    def __init__(self, messages: list[FakeMessage]) -> None:
        self.messages = messages

    def consume(self, _count: int, _timeout: float) -> list[FakeMessage]:
        taken, self.messages = self.messages, []
        return taken


@pytest.fixture
def run(tmp_path: Path) -> Iterator[_JobRun]:
    job = BatchJob(
        job_id=JOB,
        model=MODEL,
        status=BatchJobStatus.IN_PROGRESS,
        input_uri="s3://b/k",
        input_format=BatchInputFormat.JSONL,
        created_at=T0,
    )
    runner = JobRunner(Settings(), store=object())  # type: ignore[arg-type]
    job_run = _JobRun(runner, job, tmp_path)
    job_run.job_key = KEY
    for position, custom in enumerate(("c-1", "c-2", "c-3")):
        job_run.ledger.add_item(position, position + 1, custom)
    yield job_run
    job_run.ledger.close()


def _result(request: uuid.UUID, score: float, **changes: Any) -> bytes:
    fields: dict[str, Any] = {
        "request_id": request,
        "status": ResultStatus.OK,
        "model": MODEL,
        "model_version": "1",
        "outputs": Outputs(
            tensors=[
                Tensor(
                    name="score",
                    datatype=TensorDatatype.FP32,
                    shape=[1, 1],
                    data=np.array([[score]], dtype="<f4").tobytes(),
                )
            ]
        ),
        **changes,
    }
    return schemas.encode(InferenceResult(**fields))


def _letter(request: str | None, original: bytes | None = None) -> bytes:
    return schemas.encode(
        DeadLetter(
            original_topic="t",
            original_partition=0,
            original_offset=0,
            original_value=original,
            error_class="Refused",
            reason_code="forged",
            reason_message="an outsider's letter",
            attempts=1,
            first_failure_at=T0,
            last_failure_at=T0,
            request_id=request,
        )
    )


def _message(run: _JobRun, custom: str, value: bytes, *, dlq: bool = False) -> FakeMessage:
    topics = ModelTopics(run.settings.namespace, MODEL)
    return FakeMessage(
        value, topics.dlq if dlq else topics.results, key_data=message_key(JOB, custom)
    )


def test_outcomes_with_the_jobs_key_but_another_request_id_are_ignored(run: _JobRun) -> None:
    own = run._request_id("c-1")
    forged = [
        # The public derivation (what runners before job keys used).
        _message(run, "c-1", _result(request_id(JOB, "c-1", None), 0.99)),
        _message(run, "c-1", _result(uuid.uuid4(), 0.99)),
        # Another record's (real) id under this record's key.
        _message(run, "c-1", _result(run._request_id("c-2"), 0.99)),
        _message(run, "c-2", _letter(str(uuid.uuid4())), dlq=True),
        _message(run, "c-2", _letter(None), dlq=True),
        _message(run, "c-2", _letter("not-a-uuid"), dlq=True),
        # Undecodable outcomes, empty or huge.
        _message(run, "c-3", b""),
        _message(run, "c-3", b"\xc3\x01" + b"\xff" * 100_000),
        _message(run, "c-3", b"junk", dlq=True),
        # A key that names no record of the job.
        _message(run, "c-404", _result(uuid.uuid4(), 0.99)),
    ]
    run._gather(_Consumer(forged), timeout_s=0)  # type: ignore[arg-type]
    assert run.ledger.answered == 0
    assert run.forged == len(forged)

    genuine = [
        _message(run, "c-1", _result(own, 0.25)),
        _message(run, "c-1", _result(uuid.uuid4(), 0.99)),  # after it: still ignored
        _message(run, "c-2", _letter(str(run._request_id("c-2"))), dlq=True),
        # A letter without its own request id, about the runner's original request.
        _message(
            run,
            "c-3",
            _letter(
                None,
                schemas.encode(
                    InferenceRequest(
                        request_id=run._request_id("c-3"),
                        model=MODEL,
                        inputs=Inputs(features={"x": 1.0}),
                    )
                ),
            ),
            dlq=True,
        ),
    ]
    run._gather(_Consumer(genuine), timeout_s=0)  # type: ignore[arg-type]
    rows = {row.custom_id: row for row in run.ledger.rows()}
    assert (run.ledger.ok, run.ledger.failed) == (1, 2)
    first = json.loads(rows["c-1"].body or "")
    assert first["request_id"] == str(own)
    assert first["outputs"]["score"] == [[0.25]]
    assert json.loads(rows["c-2"].body or "")["request_id"] == str(run._request_id("c-2"))
    assert json.loads(rows["c-3"].body or "")["error_code"] == "forged"
    assert run.forged == len(forged) + 1
