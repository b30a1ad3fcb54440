"""Submitting a job: check the whole input first, then store it with its manifest.

Nothing is published here. A file with any invalid record, a repeated custom id, or too many
records is refused with the first errors and their line numbers; the job is kept as
``failed`` so the refusal is on record, and no input is stored for it.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pipeline.batchjobs.formats import detect_format, read_records, values_are_text
from pipeline.batchjobs.ledger import Ledger
from pipeline.batchjobs.lifecycle import advance
from pipeline.batchjobs.records import BatchItem, RecordParser, UnservableLine
from pipeline.batchjobs.store import JobStore
from pipeline.settings import Settings
from schemas.errors import SluicewayError
from schemas.models import BatchCounts, BatchInputFormat, BatchJob, BatchJobStatus

ERRORS_SHOWN = 20
JOB_ID_PATTERN = r"job-\d{8}-[0-9a-f]{12}"
"""What :func:`new_job_id` makes: the creation date and 48 random bits."""
"""How many invalid records a refusal names (the count covers all of them)."""


@dataclass
class Validation:
    records: int = 0
    generated_ids: int = 0
    invalid: int = 0
    first_errors: list[UnservableLine] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.invalid == 0

    def add_error(self, error: UnservableLine) -> None:
        self.invalid += 1
        if len(self.first_errors) < ERRORS_SHOWN:
            self.first_errors.append(error)

    def summary(self) -> str:
        shown = "; ".join(error.describe() for error in self.first_errors[:5])
        more = f" (+{self.invalid - 5} more)" if self.invalid > 5 else ""
        return f"{self.invalid} of {self.records} records invalid: {shown}{more}"


def validate(
    path: Path,
    input_format: BatchInputFormat,
    settings: Settings,
    model: str,
    *,
    on_record: Callable[[int], None] | None = None,
) -> Validation:
    """Read every record once: record rules, repeated custom ids, the record-count limit."""
    parser = RecordParser(
        settings.models[model],
        values_are_text=values_are_text(input_format),
        max_record_bytes=settings.batch.max_record_bytes,
    )
    report = Validation()
    with tempfile.TemporaryDirectory(prefix="sluiceway-validate-") as scratch:
        seen = Ledger(Path(scratch) / "ids.sqlite")
        try:
            for position, source in enumerate(read_records(path, input_format)):
                report.records += 1
                if on_record is not None:
                    on_record(report.records)
                if report.records > settings.batch.max_records:
                    report.add_error(
                        UnservableLine.of(
                            source.line,
                            None,
                            "too_many_records",
                            f"more than batch.max_records {settings.batch.max_records}",
                        )
                    )
                    break
                parsed = parser.parse(source)
                if isinstance(parsed, UnservableLine):
                    report.add_error(parsed)
                    if parsed.custom_id is None:
                        continue
                custom_id = parsed.custom_id
                assert custom_id is not None
                if isinstance(parsed, BatchItem) and parsed.custom_id_generated:
                    report.generated_ids += 1
                duplicate = seen.add_item(position, source.line, custom_id)
                if duplicate is not None:
                    report.add_error(
                        UnservableLine.of(
                            source.line,
                            custom_id,
                            "duplicate_custom_id",
                            f"custom_id already used on line {duplicate.first_line}",
                        )
                    )
        finally:
            seen.close()
    return report


@dataclass(frozen=True)
class Submission:
    job: BatchJob
    validation: Validation


def submit(
    settings: Settings,
    store: JobStore,
    source: str,
    model: str,
    *,
    input_format: BatchInputFormat | None = None,
    model_version: str | None = None,
    tenant: str | None = None,
    attributes: dict[str, str] | None = None,
    completion_window_s: float | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    on_record: Callable[[int], None] | None = None,
) -> Submission:
    """Check ``source`` and store the job; ``completion_window_s`` defaults to
    ``batch.completion_window_s``."""
    chosen_format = input_format or detect_format(source)
    job = create_job(
        settings,
        store,
        source,
        model,
        input_format=chosen_format,
        model_version=model_version,
        tenant=tenant,
        attributes=attributes,
        completion_window_s=completion_window_s,
        created=now(),
    )
    with tempfile.TemporaryDirectory(prefix="sluiceway-submit-") as scratch:
        local = _local_copy(store, source, Path(scratch) / f"input.{chosen_format.value}")
        size = local.stat().st_size
        if size > settings.batch.max_input_bytes:
            failed = advance(
                job,
                BatchJobStatus.FAILED,
                now(),
                error=(
                    "input_too_large",
                    f"{size} bytes > batch.max_input_bytes {settings.batch.max_input_bytes}",
                ),
            )
            return Submission(store.save(failed), Validation())
        report = validate(local, chosen_format, settings, model, on_record=on_record)
        counts = BatchCounts(total=report.records)
        if not report.ok:
            failed = advance(
                job,
                BatchJobStatus.FAILED,
                now(),
                counts=counts,
                error=("invalid_input", report.summary()),
            )
            return Submission(store.save(failed), report)
        kept = source if source.startswith("s3://") else local
        input_uri = store.put_input(job.job_id, kept, f"input.{chosen_format.value}")
    attributes = dict(job.attributes)
    if report.generated_ids:
        attributes["sluiceway.generated_custom_ids"] = str(report.generated_ids)
    stored = job.model_copy(
        update={"input_uri": input_uri, "counts": counts, "attributes": attributes}
    )
    return Submission(store.save(stored), report)


def new_job_id(created: datetime) -> str:
    return f"job-{created:%Y%m%d}-{uuid.uuid4().hex[:12]}"


def create_job(
    settings: Settings,
    store: JobStore,
    source: str,
    model: str,
    *,
    input_format: BatchInputFormat,
    created: datetime,
    model_version: str | None = None,
    tenant: str | None = None,
    attributes: dict[str, str] | None = None,
    completion_window_s: float | None = None,
) -> BatchJob:
    """A new job's manifest, stored as ``validating`` (its input not yet checked)."""
    if model not in settings.models:
        known = ", ".join(sorted(settings.models))
        raise SluicewayError(f"unknown model {model!r}; this deployment serves: {known}")
    window_s = completion_window_s or settings.batch.completion_window_s
    store.ensure_bucket()
    return store.save(
        BatchJob(
            job_id=new_job_id(created),
            model=model,
            model_version=model_version,
            status=BatchJobStatus.VALIDATING,
            input_uri=source,
            input_format=input_format,
            created_at=created,
            expires_at=created + timedelta(seconds=window_s),
            tenant=tenant,
            attributes=attributes or {},
        )
    )


def _local_copy(store: JobStore, source: str, scratch: Path) -> Path:
    if source.startswith("s3://"):
        return store.download(source, scratch)
    path = Path(source)
    if not path.is_file():
        raise SluicewayError(f"no such input file: {source}")
    return path
