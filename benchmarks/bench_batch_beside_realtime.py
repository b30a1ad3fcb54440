"""Real-time latency beside a running bulk batch job, against real-time traffic alone.

    .venv/bin/python benchmarks/bench_batch_beside_realtime.py [--requests 1000] [--rate 50]
        [--batch-records 200000]

One ``sluiceway worker`` serves ``invoice_risk`` from Triton. The baseline publishes
``--requests`` real-time requests at ``--rate`` per second with nothing else running. Then a
batch job of ``--batch-records`` starts (``sluiceway batch run`` in its own process), and the
same real-time traffic is measured while the job flows. Latency is from publish to the result
read. The result is the p99 ratio (beside / alone; the target is at most 2x) and the batch
records answered during the measurement. Both phases run in this process run, on the same
machine state.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from devkit.demo.examples import write_example  # noqa: E402
from devkit.settings import load_local_settings  # noqa: E402
from devkit.stack import manager  # noqa: E402
from pipeline.batchjobs.store import JobStore  # noqa: E402
from pipeline.batchjobs.submit import submit  # noqa: E402
from pipeline.settings import BatchSettings  # noqa: E402
from schemas.models import BatchInputFormat  # noqa: E402
from tests.integration.traffic import latency_summary, p99, realtime_latencies  # noqa: E402
from workers.inference.runner import prepare_topics_and_bucket  # noqa: E402
from workers.processes import ServiceProcess  # noqa: E402

MODEL = "invoice_risk"
WARM_UP = 100


def progress(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--batch-records", type=int, default=200_000)
    args = parser.parse_args()

    manager.up(load_local_settings(), progress=progress)
    settings = load_local_settings(
        namespace=f"bench-beside-{uuid.uuid4().hex[:6]}",
        batch=BatchSettings(chunk_records=500, max_outstanding=4_000, progress_interval_s=0.5),
    )
    prepare_topics_and_bucket(settings, [MODEL])
    store = JobStore(settings)
    with tempfile.TemporaryDirectory(prefix="bench-beside-") as folder:
        logs = Path(folder)
        with ServiceProcess(settings, ["worker", "--model", MODEL], logs / "worker.log"):
            progress(f"warm-up and baseline: {args.requests} real-time requests alone")
            realtime_latencies(settings, MODEL, WARM_UP, args.rate)
            alone = realtime_latencies(settings, MODEL, args.requests, args.rate)

            progress(f"a batch job of {args.batch_records:,} records starts")
            path = write_example(logs / "big.jsonl", args.batch_records, BatchInputFormat.JSONL)
            job = submit(settings, store, str(path), MODEL).job

            def answered() -> int:
                counts = store.load(job.job_id).counts
                return counts.completed + counts.failed

            runner = ServiceProcess(settings, ["batch", "run", job.job_id], logs / "runner.log")
            with runner:
                deadline = time.monotonic() + 300
                while answered() < 2_000 and time.monotonic() < deadline:
                    time.sleep(0.5)  # polling the job's progress, a benchmark's pacing
                realtime_latencies(settings, MODEL, WARM_UP, args.rate)
                before = answered()
                progress(f"measuring {args.requests} real-time requests beside the job")
                beside = realtime_latencies(settings, MODEL, args.requests, args.rate)
                during = answered() - before
                store.request_cancel(job.job_id, "benchmark over")

    ratio = p99(beside) / p99(alone)
    print()
    print(f"real-time alone:          {latency_summary(alone)}")
    print(f"beside the batch job:     {latency_summary(beside)}")
    print(f"batch records answered while measured: {during:,}")
    print(f"p99 beside / alone: {ratio:.2f}x  (target <= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
