"""``sluiceway batch submit | run | status | list | cancel | results``: bulk jobs from files."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.settings import Settings

if TYPE_CHECKING:
    from schemas.models import BatchJob

_STATUS_POLL_S = 1.0


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "batch", help="bulk jobs: a file in, results.jsonl and errors.jsonl out"
    )
    actions = parser.add_subparsers(dest="batch_action", required=True, metavar="ACTION")

    submit = actions.add_parser(
        "submit", help="check a JSONL/CSV/Parquet/Avro file (local or s3://) and store the job"
    )
    submit.add_argument("source", help="input file path or s3://bucket/key")
    submit.add_argument("--model", required=True)
    submit.add_argument("--format", choices=["jsonl", "csv", "parquet", "avro"], default=None)
    submit.add_argument("--model-version", default=None, help="pin a version (default: routing)")
    submit.add_argument("--tenant", default=None)
    submit.add_argument("--wait", action="store_true", help="run the job here until it ends")
    submit.set_defaults(handler=submit_command)

    run = actions.add_parser("run", help="run submitted jobs (resumes interrupted ones)")
    run.add_argument("job_ids", nargs="*", metavar="JOB", help="default: every unfinished job")
    run.add_argument("--follow", action="store_true", help="keep running jobs as they arrive")
    run.set_defaults(handler=run_command)

    status = actions.add_parser("status", help="a job's status, progress, rate and ETA")
    status.add_argument("job_id", metavar="JOB")
    status.add_argument("--watch", action="store_true", help="follow until the job ends")
    status.add_argument("--json", action="store_true", help="print the manifest")
    status.set_defaults(handler=status_command)

    listing = actions.add_parser("list", help="jobs, newest first")
    listing.set_defaults(handler=list_command)

    cancel = actions.add_parser(
        "cancel", help="stop publishing; in-flight records finish; partial outputs are written"
    )
    cancel.add_argument("job_id", metavar="JOB")
    cancel.add_argument("--reason", default="cancelled by user")
    cancel.add_argument("--wait", action="store_true", help="wait until the job is cancelled")
    cancel.set_defaults(handler=cancel_command)

    example = actions.add_parser(
        "example", help="write an example input file of synthetic invoices (model invoice_risk)"
    )
    example.add_argument("output", type=Path, help="*.jsonl, *.csv, *.parquet or *.avro")
    example.add_argument("--rows", type=int, default=1_000)
    example.add_argument("--explain-every", type=int, default=0, help="every n-th asks (0: none)")
    example.add_argument("--seed", type=int, default=11)
    example.set_defaults(handler=example_command)

    results = actions.add_parser("results", help="stream results.jsonl (or errors.jsonl)")
    results.add_argument("job_id", metavar="JOB")
    results.add_argument("--errors", action="store_true", help="errors.jsonl instead")
    results.add_argument("-o", "--output", type=Path, default=None, help="write to a file")
    results.set_defaults(handler=results_command)


def submit_command(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.batchjobs.store import JobStore
    from pipeline.batchjobs.submit import submit
    from schemas.models import BatchInputFormat, BatchJobStatus

    store = JobStore(settings)
    counted = _Counter("validating")
    submission = submit(
        settings,
        store,
        args.source,
        args.model,
        input_format=BatchInputFormat(args.format) if args.format else None,
        model_version=args.model_version,
        tenant=args.tenant,
        on_record=counted,
    )
    job, validation = submission.job, submission.validation
    if job.status is BatchJobStatus.FAILED:
        print(f"job {job.job_id} refused: {job.error_code}", file=sys.stderr)
        for error in validation.first_errors:
            print(f"  {error.describe()}", file=sys.stderr)
        if validation.invalid > len(validation.first_errors):
            hidden = validation.invalid - len(validation.first_errors)
            print(f"  ... and {hidden} more", file=sys.stderr)
        if not validation.first_errors:
            print(f"  {job.error_message}", file=sys.stderr)
        return 2
    if validation.generated_ids:
        print(
            f"note: {validation.generated_ids} records had no custom_id; "
            "they are named line-<n> after their line (row) number",
            file=sys.stderr,
        )
    print(f"{job.job_id}  {job.counts.total} records  {job.input_uri}", file=sys.stderr)
    print(job.job_id)
    if args.wait:
        return _run_jobs(settings, [job.job_id])
    return 0


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    from workers.batch.runner import JobRunner

    # Batch work is background work: on a shared host it yields the CPU to the worker.
    os.nice(settings.batch.runner_niceness)

    if not args.follow:
        job_ids = args.job_ids or [job.job_id for job in JobRunner(settings).pending_jobs()]
        if not job_ids:
            print("no unfinished batch jobs", file=sys.stderr)
            return 0
        return _run_jobs(settings, job_ids)
    print("running batch jobs as they are submitted (Ctrl-C to stop)", file=sys.stderr)
    runner = JobRunner(settings)
    while True:
        pending = [job.job_id for job in runner.pending_jobs()]
        if pending:
            _run_jobs(settings, pending)
        else:
            time.sleep(settings.batch.poll_interval_s)


def _run_jobs(settings: Settings, job_ids: list[str]) -> int:
    from pipeline.batchjobs.lifecycle import describe_duration, progress
    from pipeline.console import ProgressBar
    from schemas.models import BatchJobStatus
    from workers.batch.runner import JobRunner

    worst = 0
    for job_id in job_ids:
        bar: ProgressBar | None = None

        def show(job: BatchJob) -> None:
            nonlocal bar
            if bar is None and job.status is BatchJobStatus.IN_PROGRESS:
                bar = ProgressBar(job.job_id[-12:], job.counts.total)
            if bar is not None:
                bar.update(job.counts.completed + job.counts.failed)

        job = JobRunner(settings, on_progress=show).run(job_id)
        if bar is not None:
            bar.close()
        figures = progress(job, datetime.now(UTC))
        took = (
            describe_duration((job.finished_at - job.started_at).total_seconds())
            if job.finished_at and job.started_at
            else "-"
        )
        rate = f"{figures.rate_per_s:,.0f}/s" if figures.rate_per_s else "-"
        print(
            f"{job.job_id}  {job.status.value}  ok {job.counts.completed}  "
            f"failed {job.counts.failed}  of {job.counts.total}  in {took} ({rate})"
        )
        if job.status is BatchJobStatus.FAILED:
            print(f"  {job.error_code}: {job.error_message}", file=sys.stderr)
            worst = 1
        else:
            print(f"  results: {job.output_uri}\n  errors:  {job.error_uri}")
    return worst


def status_command(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.batchjobs.lifecycle import is_final
    from pipeline.batchjobs.store import JobStore

    store = JobStore(settings)
    job = store.load(args.job_id)
    if args.json:
        print(job.model_dump_json(indent=2))
        return 0
    print(_status_line(job))
    while args.watch and not is_final(job.status):
        time.sleep(_STATUS_POLL_S)
        job = store.load(args.job_id)
        print(_status_line(job))
    if job.output_uri:
        print(f"  results: {job.output_uri}\n  errors:  {job.error_uri}")
    if job.error_code:
        print(f"  {job.error_code}: {job.error_message}")
    return 0


def _status_line(job: BatchJob) -> str:
    from pipeline.batchjobs.lifecycle import describe_duration, progress

    figures = progress(job, datetime.now(UTC))
    width = 30
    filled = int(figures.fraction * width)
    rate = f"{figures.rate_per_s:,.0f}/s" if figures.rate_per_s else "-"
    eta = describe_duration(figures.eta_s) if figures.eta_s is not None else "-"
    return (
        f"{job.job_id}  {job.status.value:<11} [{'#' * filled}{'.' * (width - filled)}] "
        f"{figures.done}/{figures.total}  ok {job.counts.completed}  failed {job.counts.failed}  "
        f"{rate}  eta {eta}"
    )


def list_command(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.batchjobs.store import JobStore

    jobs = JobStore(settings).list()
    if not jobs:
        print("no batch jobs")
        return 0
    print(f"{'JOB':<30} {'MODEL':<14} {'STATUS':<11} {'DONE':>17}  CREATED")
    for job in jobs:
        done = f"{job.counts.completed + job.counts.failed}/{job.counts.total}"
        print(
            f"{job.job_id:<30} {job.model:<14} {job.status.value:<11} {done:>17}  "
            f"{job.created_at:%Y-%m-%d %H:%M:%S}"
        )
    return 0


def cancel_command(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.batchjobs.lifecycle import is_final
    from pipeline.batchjobs.store import JobStore

    store = JobStore(settings)
    job = store.load(args.job_id)
    if is_final(job.status):
        print(f"{job.job_id} is already {job.status.value}")
        return 0
    store.request_cancel(job.job_id, args.reason)
    print(f"{job.job_id}: cancel requested; its runner stops publishing and writes the outputs")
    while args.wait and not is_final(job.status):
        time.sleep(_STATUS_POLL_S)
        job = store.load(args.job_id)
    if args.wait:
        print(f"{job.job_id} {job.status.value}")
    return 0


def results_command(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.batchjobs.store import JobStore

    store = JobStore(settings)
    job = store.load(args.job_id)
    uri = job.error_uri if args.errors else job.output_uri
    if uri is None:
        print(f"{job.job_id} is {job.status.value}: no output yet", file=sys.stderr)
        return 1
    if args.output is not None:
        with args.output.open("wb") as out:
            for chunk in store.stream(uri):
                out.write(chunk)
        print(f"wrote {args.output}", file=sys.stderr)
        return 0
    try:
        for chunk in store.stream(uri):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        # The reader (``head``) has seen enough; keep Python from complaining at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def example_command(args: argparse.Namespace, settings: Settings) -> int:
    from devkit.demo.examples import write_example
    from pipeline.batchjobs.formats import detect_format

    input_format = detect_format(str(args.output))
    write_example(
        args.output, args.rows, input_format, seed=args.seed, explain_every=args.explain_every
    )
    print(f"wrote {args.rows} invoices to {args.output} ({input_format.value})", file=sys.stderr)
    return 0


class _Counter:
    """Shows validation progress for big files (every 100k records), silent for small ones."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.count = 0
        self._started = time.monotonic()

    def __call__(self, count: int) -> None:
        self.count = count
        if count % 100_000 == 0:
            rate = count / max(time.monotonic() - self._started, 1e-9)
            print(f"  {self.label}: {count:,} records ({rate:,.0f}/s)", file=sys.stderr)
