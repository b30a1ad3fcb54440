"""What each API call does, on the object store and the batch-job machinery (blocking I/O;
the HTTP edge runs these in threads). Every method takes the caller's tenant and answers only
with that tenant's objects: another tenant's batch or file is "not found", like an absent one.
"""

from __future__ import annotations

import json
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.batchjobs.lifecycle import advance, is_final
from pipeline.batchjobs.store import JobNotFoundError
from pipeline.batchjobs.submit import create_job, submit
from pipeline.settings import Settings
from schemas.models import BatchCounts, BatchInputFormat, BatchJob, BatchJobStatus
from workers.api import openai_format as fmt
from workers.api.files import ApiStore
from workers.api.idempotency import fingerprint, key_digest, replayed_batch
from workers.api.openai_format import ApiError, LineError, RequestLine
from workers.api.paging import PageRequest, page
from workers.api.tenants import Tenant, check_enqueued, enqueued_records

UPLOAD_ERRORS_SHOWN = 5


def scan_upload(path: Path, max_records: int) -> int:
    """The number of request lines of an uploaded file, or 400 naming its first bad lines."""
    errors: list[LineError] = []
    records = 0
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            checked = fmt.read_request_line(raw, number)
            if checked is None:
                continue
            records += 1
            if isinstance(checked, LineError):
                errors.append(checked)
                if len(errors) >= UPLOAD_ERRORS_SHOWN:
                    break
            if records > max_records:
                errors.append(LineError(number, f"more than {max_records} requests"))
                break
    if errors:
        shown = "; ".join(f"line {e.line}: {e.message}" for e in errors)
        raise ApiError(400, f"Invalid batch file: {shown}.", param="file", code="invalid_file")
    if records == 0:
        raise ApiError(
            400, "Invalid batch file: it holds no requests.", param="file", code="invalid_file"
        )
    return records


class ApiService:
    def __init__(
        self,
        settings: Settings,
        store: ApiStore | None = None,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.store = store or ApiStore(settings)
        self.now = now
        self._tenant_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, tenant: Tenant) -> threading.Lock:
        # Quota and idempotency checks and the create they guard run one at a time per tenant.
        with self._locks_guard:
            return self._tenant_locks.setdefault(tenant.name, threading.Lock())

    # ------------------------------------------------------------------------------- files

    def add_file(
        self, tenant: Tenant, content: Path, filename: str, purpose: str
    ) -> dict[str, Any]:
        records = scan_upload(content, self.settings.batch.max_records)
        meta = {
            "id": f"file-{uuid.uuid4().hex}",
            "object": "file",
            "bytes": content.stat().st_size,
            "created_at": int(self.now().timestamp()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
            "sluiceway_requests": records,
        }
        self.store.jobs.ensure_bucket()
        self.store.save_file(tenant.name, meta, content)
        return _public_file(meta)

    def file(self, tenant: Tenant, file_id: str) -> dict[str, Any]:
        ref = fmt.parse_file_id(file_id)
        if ref.job_id is None:
            return _public_file(self._uploaded(tenant, file_id))
        job = self._own_job(tenant, ref.job_id, not_found=("file", file_id))
        assert ref.output is not None
        uri = self._materialized(tenant, job, not_found=("file", file_id))[ref.output]
        return {
            "id": file_id,
            "object": "file",
            "bytes": self.store.object_size(uri),
            "created_at": int((job.finished_at or job.created_at).timestamp()),
            "filename": f"{job.job_id}_{ref.output}.jsonl",
            "purpose": "batch_output",
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }

    def file_content(self, tenant: Tenant, file_id: str) -> Iterator[bytes]:
        ref = fmt.parse_file_id(file_id)
        if ref.job_id is None:
            self._uploaded(tenant, file_id)
            return self.store.jobs.stream(self.store.file_uri(tenant.name, file_id))
        job = self._own_job(tenant, ref.job_id, not_found=("file", file_id))
        assert ref.output is not None
        uri = self._materialized(tenant, job, not_found=("file", file_id))[ref.output]
        return self.store.jobs.stream(uri)

    def files(self, tenant: Tenant, request: PageRequest, purpose: str | None) -> dict[str, Any]:
        found = [
            _public_file(meta)
            for meta in self.store.files(tenant.name)
            if purpose is None or meta.get("purpose") == purpose
        ]
        chosen = page(found, request, lambda meta: str(meta["id"]))
        return _list(chosen.items, chosen.has_more)

    def delete_file(self, tenant: Tenant, file_id: str) -> dict[str, Any]:
        ref = fmt.parse_file_id(file_id)
        if ref.job_id is not None:
            self._own_job(tenant, ref.job_id, not_found=("file", file_id))
            raise ApiError(
                400, "A batch's output and error files are kept with the batch.", param="file_id"
            )
        self._uploaded(tenant, file_id)
        self.store.delete_file(tenant.name, file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    def _uploaded(self, tenant: Tenant, file_id: str) -> dict[str, Any]:
        meta = self.store.file_meta(tenant.name, file_id)
        if meta is None:
            raise fmt.not_found("file", file_id)
        return meta

    # ----------------------------------------------------------------------------- batches

    def create_batch(
        self, tenant: Tenant, request: dict[str, Any], idempotency_key: str | None
    ) -> dict[str, Any]:
        input_file_id = request.get("input_file_id")
        endpoint = request.get("endpoint")
        if not isinstance(input_file_id, str):
            raise ApiError(400, "input_file_id must be a file id.", param="input_file_id")
        if endpoint not in fmt.ENDPOINTS:
            raise ApiError(
                400,
                f"endpoint must be one of {', '.join(fmt.ENDPOINTS)}.",
                param="endpoint",
                code="invalid_value",
            )
        window = request.get("completion_window")
        window_s = fmt.completion_window_seconds(window)
        metadata = fmt.checked_metadata(request.get("metadata"))
        unknown = sorted(
            set(request) - {"input_file_id", "endpoint", "completion_window", "metadata"}
        )
        if unknown:
            raise ApiError(400, f"Unsupported parameters: {unknown}.", param=unknown[0])
        if fmt.parse_file_id(input_file_id).job_id is not None:
            raise ApiError(400, "input_file_id must name an uploaded file.", param="input_file_id")
        digest = key_digest(idempotency_key) if idempotency_key is not None else None
        with self._lock(tenant):
            if digest is not None:
                replayed = replayed_batch(
                    self.store.idempotent_batch(tenant.name, digest), fingerprint(request)
                )
                if replayed is not None:
                    return self.batch(tenant, replayed)
            meta = self._uploaded(tenant, input_file_id)
            requests = int(meta.get("sluiceway_requests", 0))
            check_enqueued(tenant, enqueued_records(self._tenant_jobs(tenant)), requests)
            attributes = {
                fmt.ATTR_ENDPOINT: str(endpoint),
                fmt.ATTR_INPUT_FILE: input_file_id,
                fmt.ATTR_WINDOW: str(window),
                fmt.ATTR_METADATA: json.dumps(metadata),
            }
            job = self._submit(tenant, input_file_id, str(endpoint), attributes, window_s)
            if digest is not None:
                self.store.remember_idempotent_batch(
                    tenant.name,
                    digest,
                    {"batch_id": job.job_id, "fingerprint": fingerprint(request)},
                )
        return self._batch_object(tenant, job)

    def _submit(
        self,
        tenant: Tenant,
        input_file_id: str,
        endpoint: str,
        attributes: dict[str, str],
        window_s: float,
    ) -> BatchJob:
        with tempfile.TemporaryDirectory(prefix="sluiceway-api-") as scratch:
            uploaded = self.store.jobs.download(
                self.store.file_uri(tenant.name, input_file_id), Path(scratch) / "upload.jsonl"
            )
            converted = Path(scratch) / "input.jsonl"
            model, errors, records = self._convert(uploaded, converted, endpoint)
            if model is None:
                # No line names a model this endpoint serves: there is no job to record.
                shown = "; ".join(f"line {e.line}: {e.message}" for e in errors[:5])
                raise ApiError(
                    400, f"No request of the file can run: {shown}.", param="input_file_id"
                )
            if errors:
                failed = create_job(
                    self.settings,
                    self.store.jobs,
                    self.store.file_uri(tenant.name, input_file_id),
                    model,
                    input_format=BatchInputFormat.JSONL,
                    created=self.now(),
                    tenant=tenant.name,
                    attributes={**attributes, fmt.ATTR_ERRORS: fmt.encode_errors(errors)},
                    completion_window_s=window_s,
                )
                summary = f"{len(errors)} of {records} requests invalid"
                return self.store.jobs.save(
                    advance(
                        failed,
                        BatchJobStatus.FAILED,
                        self.now(),
                        counts=BatchCounts(total=records),
                        error=("invalid_input", summary),
                    )
                )
            submission = submit(
                self.settings,
                self.store.jobs,
                str(converted),
                model,
                input_format=BatchInputFormat.JSONL,
                tenant=tenant.name,
                attributes=attributes,
                completion_window_s=window_s,
                now=self.now,
            )
        job = submission.job
        if submission.validation.ok:
            return job
        line_errors = [
            LineError(error.line, error.refusal.message, error.refusal.reason_code)
            for error in submission.validation.first_errors
        ]
        kept = {**job.attributes, fmt.ATTR_ERRORS: fmt.encode_errors(line_errors)}
        return self.store.jobs.save(job.model_copy(update={"attributes": kept}))

    def _convert(
        self, uploaded: Path, converted: Path, endpoint: str
    ) -> tuple[str | None, list[LineError], int]:
        """Request lines -> job-input records; the model every line names, the line errors,
        and the number of requests."""
        model: str | None = None
        errors: list[LineError] = []
        records = 0
        with uploaded.open("rb") as lines, converted.open("w") as out:
            for number, raw in enumerate(lines, start=1):
                checked = fmt.read_request_line(raw, number)
                if checked is None:
                    continue
                records += 1
                if not isinstance(checked, RequestLine):
                    errors.append(checked)
                    continue
                problem = self._model_problem(checked, endpoint, model)
                if problem is not None:
                    errors.append(problem)
                    continue
                model = str(checked.model)
                record = fmt.sluiceway_record(checked, endpoint)
                if isinstance(record, LineError):
                    errors.append(record)
                    continue
                out.write(json.dumps(record) + "\n")
        return model, errors, records

    def _model_problem(
        self, request: RequestLine, endpoint: str, model: str | None
    ) -> LineError | None:
        named = request.model
        if not isinstance(named, str):
            return LineError(request.line, "body.model must name a model", "invalid_model")
        if model is not None and named != model:
            return LineError(
                request.line,
                f"every request of a batch names one model: {model}, not {named}",
                "mixed_models",
            )
        settings = self.settings.models.get(named)
        if settings is None or not fmt.endpoint_serves(endpoint, settings):
            served = sorted(
                name
                for name, served in self.settings.models.items()
                if fmt.endpoint_serves(endpoint, served)
            )
            return LineError(
                request.line,
                f"model {named[:64]!r} is not served on {endpoint}; "
                f"models there: {', '.join(served)}",
                "model_not_found",
            )
        return None

    def batch(self, tenant: Tenant, batch_id: str) -> dict[str, Any]:
        job = self._own_job(tenant, fmt.job_id_of_batch(batch_id), not_found=("batch", batch_id))
        return self._batch_object(tenant, job)

    def batches(self, tenant: Tenant, request: PageRequest) -> dict[str, Any]:
        jobs = self._tenant_jobs(tenant)
        chosen = page(jobs, request, lambda job: job.job_id)
        return _list([self._batch_object(tenant, job) for job in chosen.items], chosen.has_more)

    def cancel(self, tenant: Tenant, batch_id: str) -> dict[str, Any]:
        job = self._own_job(tenant, fmt.job_id_of_batch(batch_id), not_found=("batch", batch_id))
        if job.status is not BatchJobStatus.CANCELLED and is_final(job.status):
            raise ApiError(
                409,
                f"Cannot cancel a batch with status {job.status.value}.",
                code="batch_not_cancellable",
            )
        if self.store.jobs.cancel_request(job.job_id) is None and not is_final(job.status):
            self.store.jobs.request_cancel(
                job.job_id, f"cancelled through the API by {tenant.name}"
            )
        return self._batch_object(tenant, job)

    # ---------------------------------------------------------------------------- helpers

    def _tenant_jobs(self, tenant: Tenant) -> list[BatchJob]:
        """The tenant's API batches, newest first."""
        return [
            job
            for job in self.store.jobs.list()
            if job.tenant == tenant.name and fmt.ATTR_ENDPOINT in job.attributes
        ]

    def _own_job(self, tenant: Tenant, job_id: str, *, not_found: tuple[str, str]) -> BatchJob:
        try:
            job = self.store.jobs.load(job_id)
        except JobNotFoundError:
            raise fmt.not_found(*not_found) from None
        if job.tenant != tenant.name or fmt.ATTR_ENDPOINT not in job.attributes:
            raise fmt.not_found(*not_found)
        return job

    def _batch_object(self, tenant: Tenant, job: BatchJob) -> dict[str, Any]:
        cancel = self.store.jobs.cancel_request(job.job_id)
        cancelling_at = (
            datetime.fromtimestamp(int(cancel["requested_at_ms"]) / 1000, UTC) if cancel else None
        )
        usage = None
        if is_final(job.status) and job.output_uri is not None:
            usage = self._usage(tenant, job)
        return fmt.batch_object(job, cancelling_at=cancelling_at, usage=usage)

    def _usage(self, tenant: Tenant, job: BatchJob) -> dict[str, int]:
        found = self.store.usage(tenant.name, job.job_id)
        if found is None:
            self._materialized(tenant, job, not_found=("batch", job.job_id))
            found = self.store.usage(tenant.name, job.job_id) or {}
        return found

    def _materialized(
        self, tenant: Tenant, job: BatchJob, *, not_found: tuple[str, str]
    ) -> dict[str, str]:
        """The batch's OpenAI output and error files (written once, when first asked for
        after the job ended), by kind."""
        if not is_final(job.status) or job.output_uri is None or job.error_uri is None:
            raise fmt.not_found(*not_found)
        uris = {
            "output": self.store.jobs.uri(job.job_id, "openai-output.jsonl"),
            "errors": self.store.jobs.uri(job.job_id, "openai-errors.jsonl"),
        }
        if self.store.usage(tenant.name, job.job_id) is not None:
            return uris
        endpoint = job.attributes[fmt.ATTR_ENDPOINT]
        created = int((job.finished_at or job.created_at).timestamp())
        tokens = {"prompt_tokens": 0, "completion_tokens": 0, "records": 0}
        with tempfile.TemporaryDirectory(prefix="sluiceway-api-out-") as scratch:
            output = Path(scratch) / "output.jsonl"
            errors = Path(scratch) / "errors.jsonl"
            with output.open("w") as out:
                for result in _json_lines(self.store.jobs.stream(job.output_uri)):
                    line = fmt.output_line(result, endpoint, created)
                    usage = line["response"]["body"]["usage"]
                    tokens["prompt_tokens"] += usage["prompt_tokens"]
                    tokens["completion_tokens"] += usage["completion_tokens"]
                    tokens["records"] += 1
                    out.write(json.dumps(line) + "\n")
            with errors.open("w") as out:
                for error in _json_lines(self.store.jobs.stream(job.error_uri)):
                    out.write(json.dumps(fmt.error_output_line(error)) + "\n")
            self.store.jobs.put_output(job.job_id, "openai-output.jsonl", output)
            self.store.jobs.put_output(job.job_id, "openai-errors.jsonl", errors)
        # Usage last: its presence says both files are written.
        self.store.remember_usage(tenant.name, job.job_id, tokens)
        return uris


def _json_lines(chunks: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield dict(json.loads(line))
    if pending.strip():
        yield dict(json.loads(pending))


def _public_file(meta: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in meta.items() if not name.startswith("sluiceway_")}


def _list(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }
