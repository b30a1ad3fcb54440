"""A job's status lifecycle and its progress figures. Pure: the clock is passed in.

validating -> in_progress -> finalizing -> completed | cancelled | expired, and failed from
any non-final status. ``validating`` covers the time from submission until a runner starts
the job, as in batch APIs users already know.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from schemas.errors import SluicewayError
from schemas.models import BatchCounts, BatchJob, BatchJobStatus

_S = BatchJobStatus
_NEXT: dict[BatchJobStatus, frozenset[BatchJobStatus]] = {
    _S.VALIDATING: frozenset({_S.IN_PROGRESS, _S.FINALIZING, _S.FAILED}),
    _S.IN_PROGRESS: frozenset({_S.FINALIZING, _S.FAILED}),
    _S.FINALIZING: frozenset({_S.COMPLETED, _S.CANCELLED, _S.EXPIRED, _S.FAILED}),
}


class IllegalTransitionError(SluicewayError):
    pass


def advance(
    job: BatchJob,
    status: BatchJobStatus,
    now: datetime,
    *,
    counts: BatchCounts | None = None,
    error: tuple[str, str] | None = None,
) -> BatchJob:
    """The job in ``status``, with the timestamp of that step set once."""
    if status is not job.status and status not in _NEXT.get(job.status, frozenset()):
        raise IllegalTransitionError(f"job {job.job_id}: {job.status} cannot become {status}")
    update: dict[str, object] = {"status": status}
    if status is _S.IN_PROGRESS and job.started_at is None:
        update["started_at"] = now
    if status is _S.FINALIZING and job.finalizing_at is None:
        update["finalizing_at"] = now
    if status not in _NEXT:
        update["finished_at"] = now
    if counts is not None:
        update["counts"] = counts
    if error is not None:
        update["error_code"], update["error_message"] = error
    return job.model_copy(update=update)


def is_final(status: BatchJobStatus) -> bool:
    return status not in _NEXT


def final_status(*, cancelled: bool, expired: bool) -> BatchJobStatus:
    """How a job ends once its outputs are written: a cancel outranks the deadline."""
    if cancelled:
        return _S.CANCELLED
    if expired:
        return _S.EXPIRED
    return _S.COMPLETED


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    rate_per_s: float | None
    eta_s: float | None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


def progress(job: BatchJob, now: datetime) -> Progress:
    """Records answered so far, the rate since the job started, and the time left at it."""
    done = job.counts.completed + job.counts.failed
    total = job.counts.total
    if job.started_at is None or done == 0:
        return Progress(done, total, None, None)
    until = job.finished_at or now
    elapsed = (until - job.started_at).total_seconds()
    if elapsed <= 0:
        return Progress(done, total, None, None)
    rate = done / elapsed
    eta = None if is_final(job.status) else max(total - done, 0) / rate
    return Progress(done, total, rate, eta)


def describe_duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
