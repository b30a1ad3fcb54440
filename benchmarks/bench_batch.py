"""A bulk batch job of a million records on the local stack: records/s end to end, peak memory.

Run on the local stack (``sluiceway stack up`` first, or let this script do it)::

    .venv/bin/python benchmarks/bench_batch.py [--records 1000000] [--baseline-records 100000]

Two jobs run one after the other in this process run, each through the real commands
(``sluiceway batch submit``, then ``sluiceway batch run``, each in its own process) with one
``sluiceway worker`` serving the model ``invoice_risk`` from Triton:

- the baseline job (``--baseline-records``, 100k by default),
- the measured job (``--records``, 1M by default).

For each: seconds to validate and store the input (submit), seconds to run, records/s end to
end (submit start to final manifest), and the peak resident memory (VmHWM) of the submit and
runner processes. The ratios against the baseline are the result: records/s should hold, and
memory should not grow with the input (the runner streams the file and keeps its ledger on
disk).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from devkit.demo.examples import write_example  # noqa: E402
from devkit.settings import load_local_settings  # noqa: E402
from devkit.stack import manager  # noqa: E402
from pipeline.batchjobs.store import JobStore  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from schemas.models import BatchInputFormat, BatchJobStatus  # noqa: E402
from workers.inference.runner import prepare_topics_and_bucket  # noqa: E402
from workers.processes import ServiceProcess  # noqa: E402

MODEL = "invoice_risk"
SAMPLE_S = 0.5


def progress(message: str) -> None:
    print(f"[bench] {message}", flush=True)


@dataclass(frozen=True)
class JobFigures:
    records: int
    submit_s: float
    run_s: float
    submit_peak_mib: float
    runner_peak_mib: float

    @property
    def records_per_s(self) -> float:
        return self.records / (self.submit_s + self.run_s)


def _peak_rss_mib(pid: int) -> float | None:
    """The process's high-water mark of resident memory (VmHWM), while it still runs."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _run_watched(
    settings: Settings, args: list[str], log: Path, on_tick: object = None
) -> tuple[float, float, ServiceProcess]:
    """Run a sluiceway command to its end; return (seconds, peak RSS MiB, process)."""
    process = ServiceProcess(settings, args, log).start()
    started = time.monotonic()
    peak = 0.0
    while not process.exited():
        peak = max(peak, _peak_rss_mib(process.pid) or 0.0)
        if callable(on_tick):
            on_tick()
        time.sleep(SAMPLE_S)
    took = time.monotonic() - started
    assert process.process is not None
    if process.process.returncode != 0:
        raise SystemExit(f"`sluiceway {' '.join(args)}` failed:\n{process.tail(30)}")
    return took, peak, process


def run_job(settings: Settings, records: int, workdir: Path) -> JobFigures:
    path = workdir / f"invoices-{records}.jsonl"
    if not path.exists():
        progress(f"writing {records:,} invoices to {path}")
        write_example(path, records, BatchInputFormat.JSONL, explain_every=100)
    progress(f"submitting {path.name} ({path.stat().st_size / 2**20:,.0f} MiB)")
    submit_log = workdir / f"submit-{records}.log"
    submit_log.unlink(missing_ok=True)
    submit_s, submit_peak, _ = _run_watched(
        settings, ["batch", "submit", str(path), "--model", MODEL], submit_log
    )
    job_id = submit_log.read_text().strip().splitlines()[-1]
    store = JobStore(settings)
    progress(f"running {job_id}")
    last_print = [0.0]

    def tick() -> None:
        if time.monotonic() - last_print[0] < 10:
            return
        last_print[0] = time.monotonic()
        job = store.load(job_id)
        done = job.counts.completed + job.counts.failed
        progress(f"  {job.status.value}: {done:,}/{job.counts.total:,}")

    run_s, runner_peak, _ = _run_watched(
        settings, ["batch", "run", job_id], workdir / f"run-{records}.log", tick
    )
    job = store.load(job_id)
    if job.status is not BatchJobStatus.COMPLETED or job.counts.completed != records:
        raise SystemExit(f"job {job_id} ended {job.status.value} with {job.counts}")
    assert job.output_uri is not None
    lines = sum(chunk.count(b"\n") for chunk in store.stream(job.output_uri))
    if lines != records:
        raise SystemExit(f"results.jsonl has {lines} lines, expected {records}")
    return JobFigures(records, submit_s, run_s, submit_peak, runner_peak)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--baseline-records", type=int, default=100_000)
    args = parser.parse_args()

    manager.up(load_local_settings(), progress=progress)
    settings = load_local_settings(namespace=f"bench-batch-{uuid.uuid4().hex[:6]}")
    prepare_topics_and_bucket(settings, [MODEL])
    workdir = REPO_ROOT / ".sluiceway" / "bench-batch"
    workdir.mkdir(parents=True, exist_ok=True)
    with ServiceProcess(settings, ["worker", "--model", MODEL], workdir / "worker.log"):
        baseline = run_job(settings, args.baseline_records, workdir)
        measured = run_job(settings, args.records, workdir)

    print()
    print(
        f"{'job':<10}{'records':>12}{'submit s':>10}{'run s':>9}{'records/s':>11}"
        f"{'submit MiB':>12}{'runner MiB':>12}"
    )
    for name, figures in (("baseline", baseline), ("measured", measured)):
        print(
            f"{name:<10}{figures.records:>12,}{figures.submit_s:>10.1f}{figures.run_s:>9.1f}"
            f"{figures.records_per_s:>11,.0f}{figures.submit_peak_mib:>12.0f}"
            f"{figures.runner_peak_mib:>12.0f}"
        )
    growth = measured.records / baseline.records
    rate_ratio = measured.records_per_s / baseline.records_per_s
    print(
        f"\n{growth:.0f}x the records: records/s {rate_ratio:.2f}x"
        f", runner peak memory {measured.runner_peak_mib / baseline.runner_peak_mib:.2f}x"
        f", submit peak memory {measured.submit_peak_mib / baseline.submit_peak_mib:.2f}x"
        " (1.00x: memory does not grow with the input)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
