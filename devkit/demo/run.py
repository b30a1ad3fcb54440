"""The end-to-end job ``make demo`` runs: SAP invoices and Salesforce cases through Sluiceway.

It starts one inference worker serving two routes. ``invoice_risk`` (the trained demo model in
Triton, see ``devkit/modeling``) scores supplier invoices published the way the SAP connector
would, every fourth asking for an explanation. ``case_summary`` (vLLM's OpenAI-compatible API)
summarises Salesforce support cases, every fourth with token log-probabilities. No real vLLM can
run on these machines, so unless ``vllm_url`` names one, the route is served by the vLLM protocol
test server from ``tests/`` (it is not vLLM; its answers are canned).

Requests are published at a steady rate with a progress bar; every ``InferenceResult`` is read
back from the results topics and checked: scores against the trained weights, explanations
exactly where asked, stored attribution vectors (fetched by byte range, as the SDK does) adding
up to the score's logit gap from the baseline. The summary gives throughput, end-to-end latency
percentiles, status counts, dead letters, a sample with its top attributions, where the full
results live, and what is still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
from confluent_kafka import ConsumerGroupState, KafkaException, TopicPartition

import schemas
from devkit.demo.rollback import RollbackStory, render_story, run_rollback_story
from devkit.modeling.cases import CASE_MODEL, generate_cases
from devkit.modeling.invoices import FEATURES, generate
from devkit.modeling.logistic import LinearModel
from devkit.modeling.training import DEMO_MODEL
from devkit.settings import LocalSettings
from devkit.stack import manager
from devkit.stack.services import resolve
from pipeline.console import ProgressBar
from pipeline.kafka import clients
from pipeline.kafka.admin import end_offsets
from pipeline.kafka.clients import ConsumerRole, ProducerRole
from pipeline.kafka.events import follow
from pipeline.settings import AnySettings, Settings
from pipeline.storage.client import make_client
from pipeline.topics import ModelTopics
from schemas.identity import message_key
from schemas.models import (
    GenerationParams,
    InferenceRequest,
    InferenceResult,
    Inputs,
    ResultStatus,
    Source,
    TextInput,
)
from schemas.rendering import readable
from workers.inference.contracts import TOP_K_ATTRIBUTIONS as TOP_K
from workers.inference.runner import prepare_topics_and_bucket
from workers.inference.worker import worker_group_id
from workers.processes import Principals, ServiceProcess, as_principal

Progress = Callable[[str], None]
MODEL = DEMO_MODEL
TEXT_MODEL = CASE_MODEL
EXPLAIN_EVERY = 4
"""Every fourth request asks for an explanation (the rest are scored or summarised only)."""
FAITHFULNESS_SAMPLE = 20
"""Explained results whose full attribution vector is fetched from the store and checked."""
DEFAULT_REQUESTS = 5_000
DEFAULT_CASES = 200
DEFAULT_RATE = 500.0
"""Requests per second offered by the simulated feeds (0: as fast as the producer goes).
Well inside what one worker sustains next to the whole stack on a 2-core machine (about
1,100/s), so the latency shown is service time, not a growing backlog; ``--rate 0`` shows the
saturated throughput instead."""
PROTOCOL_SERVER_LATENCY_S = 0.02
"""How long the vLLM protocol test server takes per completion, so the route has a cost."""
RESULTS_TIMEOUT_S = 180.0


@dataclass
class DemoReport:
    run_id: str
    requests_topic: str
    results_topic: str
    bucket: str
    rate: float = 0.0
    published: int = 0
    results_read: int = 0
    results_correct: int = 0
    explained: int = 0
    explanations_where_asked: int = 0
    faithful: int = 0
    faithfulness_checked: int = 0
    high_risk: int = 0
    versions: dict[str, int] = field(default_factory=dict)
    segments: set[str] = field(default_factory=set)
    ranged_get_matched: bool = False
    batches: int = 0
    commits: int = 0
    dead_lettered: int = 0
    triton_inferences: int = 0
    triton_executions: int = 0
    seconds: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    """Invoices: from handing the request to the producer to reading its result."""
    worker_ms: list[float] = field(default_factory=list)
    """Invoices: the worker's own ``timings.total_ms`` (queued in the batcher + backend)."""
    sample: dict[str, Any] = field(default_factory=dict)
    cases_topic: str = ""
    cases_published: int = 0
    cases_summarised: int = 0
    cases_explained_where_asked: int = 0
    case_segments: set[str] = field(default_factory=set)
    text_server: str = ""
    text_sample: dict[str, Any] = field(default_factory=dict)
    running: list[str] = field(default_factory=list)
    story: RollbackStory | None = None
    """The second half: v2 promoted, rolled back by the monitor (``None`` when skipped)."""

    @property
    def ok(self) -> bool:
        return (
            self.published == self.results_read == self.results_correct
            and self.explanations_where_asked == self.published
            and self.faithful == self.faithfulness_checked > 0
            and self.ranged_get_matched
            and self.cases_published == self.cases_summarised
            and self.cases_explained_where_asked == self.cases_published
            and self.dead_lettered == 0
            and (self.story is None or self.story.ok)
        )

    def latency_percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def worker_percentile(self, q: float) -> float:
        return float(np.percentile(self.worker_ms, q)) if self.worker_ms else float("nan")


def _invoice_requests(count: int, run_id: str) -> list[InferenceRequest]:
    invoices = generate(count, seed=11).x
    return [
        InferenceRequest(
            request_id=uuid.uuid4(),
            model=MODEL,
            inputs=Inputs(
                features={
                    name: round(float(value), 2)
                    for name, value in zip(FEATURES, invoice, strict=True)
                }
            ),
            explain=index % EXPLAIN_EVERY == 0,
            correlation_id=f"{run_id}-{index}",
            source=Source(
                system="SAP S/4HANA", entity_type="SupplierInvoice", entity_id=f"51056{index:05d}"
            ),
            attributes={"demo_run": run_id},
        )
        for index, invoice in enumerate(invoices)
    ]


def _case_requests(count: int, run_id: str) -> list[InferenceRequest]:
    return [
        InferenceRequest(
            request_id=uuid.uuid4(),
            model=TEXT_MODEL,
            inputs=Inputs(
                text=TextInput(
                    prompt=case.prompt, params=GenerationParams(max_tokens=48, temperature=0.0)
                )
            ),
            explain=index % EXPLAIN_EVERY == 0,
            correlation_id=f"{run_id}-case-{index}",
            source=Source(system="Salesforce", entity_type="Case", entity_id=case.case_number),
            attributes={"demo_run": run_id, "account": case.account},
        )
        for index, case in enumerate(generate_cases(count, seed=11))
    ]


def _publish(
    settings: Settings, batches: list[tuple[str, list[InferenceRequest]]], rate: float
) -> dict[str, float]:
    """Produce every request at ``rate`` per second (interleaving the feeds); return when
    each was handed to the producer (monotonic seconds), by request id."""
    producer = clients.producer(settings.kafka, role=ProducerRole.FEED)
    failures: list[str] = []
    sent_at: dict[str, float] = {}
    # Encoded before the clock starts, so the paced feed costs the process almost nothing.
    mixed = [
        (topic, request, schemas.encode(request), _headers(request))
        for topic, request in _interleave(batches)
    ]
    bar = ProgressBar("published", len(mixed))
    started = time.monotonic()
    for index, (topic, request, value, headers) in enumerate(mixed):
        if rate > 0:
            pause = started + index / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # pacing the feed, not waiting for a condition
        sent_at[str(request.request_id)] = time.monotonic()
        producer.produce(
            topic,
            value,
            key=message_key(request),
            headers=headers,
            on_delivery=lambda err, _msg: failures.append(str(err)) if err else None,
        )
        producer.poll(0)
        bar.advance()
    bar.close()
    if producer.flush(30) or failures:
        raise RuntimeError(f"requests not acknowledged: {failures[:3]}")
    return sent_at


def _headers(request: InferenceRequest) -> list[tuple[str, str | bytes | None]]:
    return list(schemas.message_headers(request.AVRO_NAME))


def _interleave(
    batches: list[tuple[str, list[InferenceRequest]]],
) -> list[tuple[str, InferenceRequest]]:
    """Merge the feeds so each is spread evenly over the run, as live systems publish."""
    keyed = [
        ((index + 0.5) / len(requests), topic, request)
        for topic, requests in batches
        for index, request in enumerate(requests)
    ]
    keyed.sort(key=lambda item: item[0])
    return [(topic, request) for _, topic, request in keyed]


def _end_offsets(settings: Settings, topics: list[str]) -> list[TopicPartition]:
    return [
        TopicPartition(topic, partition, offset)
        for topic in topics
        for partition, offset in sorted(end_offsets(settings.kafka, topic).items())
    ]


def _read_results(
    settings: Settings, start: list[TopicPartition], wanted: set[str], timeout_s: float
) -> dict[str, tuple[InferenceResult, float]]:
    consumer = clients.consumer(
        settings.kafka,
        # Within the SDK's group prefix: on a secured broker the feeds read as its principal.
        group_id=clients.throwaway_group("sluiceway-client-demo-reader"),
        role=ConsumerRole.READER,
    )
    consumer.assign(start)
    found: dict[str, tuple[InferenceResult, float]] = {}
    deadline = time.monotonic() + timeout_s
    bar = ProgressBar("answered", len(wanted))
    try:
        # One message per read: reading many at once would hold results back until that many
        # arrived or the poll timed out, and the wait would count as latency. The workers are
        # processes of their own, so reading here takes nothing from them.
        for result in follow(
            consumer,
            InferenceResult,
            until=lambda: len(found) >= len(wanted) or time.monotonic() >= deadline,
            batch=1,
        ):
            if str(result.request_id) in wanted:
                found[str(result.request_id)] = (result, time.monotonic())
                bar.update(len(found))
    finally:
        bar.close()
        consumer.close()
    return found


def _triton_counts(settings: Settings) -> tuple[int, int]:
    client = triton_grpc.InferenceServerClient(settings.backends.triton.grpc_url)
    try:
        inferences = executions = 0
        for version in ("1", "2"):
            stats = client.get_inference_statistics(MODEL, version, as_json=True)
            model = stats["model_stats"][0]
            inferences += int(model.get("inference_count", 0))
            executions += int(model.get("execution_count", 0))
        return inferences, executions
    finally:
        client.close()


def _model(settings: LocalSettings, version: str) -> LinearModel:
    folder = resolve(settings.stack.model_repository) / MODEL / version
    return LinearModel.load(folder / "weights.npz")


def _score(result: InferenceResult) -> float | None:
    tensors = result.outputs.tensors if result.outputs else None
    if result.status is not ResultStatus.OK or not tensors:
        return None
    score = next((t for t in tensors if t.name == "score"), None)
    return None if score is None else float(np.frombuffer(score.data, dtype="<f4")[0])


def _segment_record(settings: Settings, result: InferenceResult) -> dict[str, Any]:
    ref = result.payload_ref
    assert ref is not None
    store = make_client(settings.object_store)
    body = store.get_object(ref.bucket, ref.key, offset=ref.offset, length=ref.length)
    try:
        record: dict[str, Any] = json.loads(body.read())
    finally:
        body.close()
        body.release_conn()
    return record


def _check_invoices(
    report: DemoReport,
    requests: list[InferenceRequest],
    found: dict[str, tuple[InferenceResult, float]],
    sent_at: dict[str, float],
    settings: LocalSettings,
) -> None:
    models: dict[str, LinearModel] = {}
    for request in requests:
        entry = found.get(str(request.request_id))
        if entry is None:
            continue
        result, received_at = entry
        report.results_read += 1
        report.statuses[result.status.value] += 1
        report.latencies_ms.append((received_at - sent_at[str(request.request_id)]) * 1000)
        if result.timings is not None and result.timings.total_ms is not None:
            report.worker_ms.append(result.timings.total_ms)
        version = result.model_version or "?"
        report.versions[version] = report.versions.get(version, 0) + 1
        if result.payload_ref is not None:
            report.segments.add(result.payload_ref.key)
        model = models.get(version) or models.setdefault(version, _model(settings, version))
        features = request.inputs.features or {}
        row = np.array([[float(features[name] or 0.0) for name in FEATURES]], dtype=np.float32)
        expected = float(model.predict_proba(row.astype(np.float64))[0])
        score = _score(result)
        if score is not None and abs(score - expected) < 1e-5:
            report.results_correct += 1
            report.high_risk += score >= 0.5
        has_explanation = result.explanation is not None
        report.explained += has_explanation
        report.explanations_where_asked += has_explanation == request.explain
        if has_explanation and report.faithfulness_checked < FAITHFULNESS_SAMPLE:
            # Completeness: the stored attributions add up to logit(x) - logit(baseline).
            record = _segment_record(settings, result)
            attributions = np.array([record["attributions"][name] for name in FEATURES])
            gap = (
                model.logit(row.astype(np.float64))[0]
                - model.logit(model.baseline.reshape(1, -1))[0]
            )
            report.faithfulness_checked += 1
            report.faithful += abs(attributions.sum() - gap) < 1e-3
            if not report.sample:
                report.ranged_get_matched = record["request_id"] == str(result.request_id)
                report.sample = {
                    "invoice": request.source.entity_id if request.source else "",
                    "features": features,
                    "score": score,
                    "result_event": readable(result),
                    "segment_record": record,
                }


def _check_cases(
    report: DemoReport,
    requests: list[InferenceRequest],
    found: dict[str, tuple[InferenceResult, float]],
) -> None:
    for request in requests:
        entry = found.get(str(request.request_id))
        if entry is None:
            continue
        result = entry[0]
        report.statuses[result.status.value] += 1
        text = result.outputs.text if result.outputs else None
        if result.status is ResultStatus.OK and text is not None and text.text:
            report.cases_summarised += 1
        if result.payload_ref is not None:
            report.case_segments.add(result.payload_ref.key)
        explanation = result.explanation
        has_logprobs = explanation is not None and bool(explanation.token_logprobs)
        report.cases_explained_where_asked += has_logprobs == request.explain
        if has_logprobs and not report.text_sample and text is not None and explanation:
            report.text_sample = {
                "case": request.source.entity_id if request.source else "",
                "summary": text.text,
                "token_logprobs": [
                    (t.token, round(t.logprob, 3)) for t in (explanation.token_logprobs or [])[:6]
                ],
            }


@contextlib.contextmanager
def _vllm_endpoint(
    settings: AnySettings, vllm_url: str | None
) -> Iterator[tuple[AnySettings, str]]:
    """Settings whose vLLM backend is ``vllm_url``, or the protocol test server started here."""
    if vllm_url is not None:
        yield _with_vllm_url(settings, vllm_url), f"vLLM at {vllm_url}"
        return
    with _protocol_server() as url:
        label = f"the vLLM protocol test server at {url} (not vLLM; canned answers)"
        yield _with_vllm_url(settings, url), label


@contextlib.contextmanager
def _protocol_server() -> Iterator[str]:
    """Run ``devkit/servers/openai_server.py`` as a process for the demo's text route (no vLLM
    runs on these machines)."""
    command = [
        sys.executable,
        "-m",
        "devkit.servers.openai_server",
        "--port=0",
        f"--model={TEXT_MODEL}",
        f"--latency-s={PROTOCOL_SERVER_LATENCY_S}",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        first_line = process.stdout.readline()  # printed once the socket is bound
        found = re.search(r" on (\S+) serving", first_line)
        if found is None:
            raise RuntimeError(f"the vLLM protocol test server did not start: {first_line!r}")
        yield found.group(1)
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def _with_vllm_url(settings: AnySettings, url: str) -> AnySettings:
    vllm = settings.backends.vllm.model_copy(update={"base_url": url})
    backends = settings.backends.model_copy(update={"vllm": vllm})
    return settings.model_copy(update={"backends": backends})


@dataclass
class WorkerRun:
    """``sluiceway worker`` in its own process, as it is deployed; SIGTERM drains it."""

    service: ServiceProcess
    group_ids: list[str]
    """One consumer group per model the worker serves."""
    models: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def read_final_counts(self) -> None:
        """The counters the worker prints when it stops (``worker stopped: results=...``)."""
        final = next(
            (line for line in reversed(self.service.tail(50).splitlines()) if "stopped:" in line),
            "",
        )
        self.counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", final)}

    def wait_until_assigned(self, settings: Settings, timeout_s: float = 60.0) -> None:
        """Block until each of the worker's consumer groups is stable with partitions assigned."""
        admin = clients.admin(settings.kafka)
        deadline = time.monotonic() + timeout_s
        waiting = set(self.group_ids)
        while time.monotonic() < deadline:
            if self.service.exited():
                raise RuntimeError(f"the worker exited:\n{self.service.tail()}")
            futures = admin.describe_consumer_groups(sorted(waiting), request_timeout=5)
            for group_id, future in futures.items():
                with contextlib.suppress(KafkaException):
                    group = future.result()
                    assigned = any(m.assignment.topic_partitions for m in group.members)
                    if group.state == ConsumerGroupState.STABLE and assigned:
                        waiting.discard(group_id)
            if not waiting:
                return
            time.sleep(0.2)  # polling the broker for a state change, bounded by the deadline
        raise RuntimeError(
            f"the worker's groups {sorted(waiting)} were not assigned in {timeout_s}s"
        )


@contextlib.contextmanager
def _worker_process(settings: Settings, models: list[str], log: Path) -> Iterator[WorkerRun]:
    args = ["worker"]
    for model in models:
        args += ["--model", model]
    with ServiceProcess(settings, args, log) as service:
        run = WorkerRun(service, [worker_group_id(settings.namespace, m) for m in models], models)
        try:
            yield run
        finally:
            service.stop()
            run.read_final_counts()


def worker_assignments(
    settings: Settings, models: list[str], principals: Principals | None
) -> list[tuple[Settings, list[str]]]:
    """Which worker processes serve ``models``: one for all of them, or on a secured broker
    one per model, each as its model's principal (pure)."""
    if principals is None:
        return [(settings, models)]
    return [(as_principal(settings, principals.workers[model]), [model]) for model in models]


@contextlib.contextmanager
def _worker_processes(
    settings: Settings, models: list[str], principals: Principals | None, logs: Path
) -> Iterator[list[WorkerRun]]:
    with contextlib.ExitStack() as stack:
        runs = []
        for worker_settings, served in worker_assignments(settings, models, principals):
            name = "demo-worker" if principals is None else f"demo-worker-{served[0]}"
            runs.append(
                stack.enter_context(_worker_process(worker_settings, served, logs / f"{name}.log"))
            )
        yield runs


def _dead_letters(settings: Settings, models: list[str]) -> int:
    return sum(
        sum(end_offsets(settings.kafka, ModelTopics(settings.namespace, model).dlq).values())
        for model in models
    )


async def _run(
    settings: LocalSettings,
    count: int,
    cases: int,
    rate: float,
    text_server: str,
    progress: Progress,
    principals: Principals | None,
) -> DemoReport:
    operator = settings if principals is None else as_principal(settings, principals.operator)
    client = settings if principals is None else as_principal(settings, principals.client)
    topics = ModelTopics(settings.namespace, MODEL)
    case_topics = ModelTopics(settings.namespace, TEXT_MODEL)
    run_id = uuid.uuid4().hex[:12]
    report = DemoReport(run_id, topics.requests, topics.results, settings.object_store.bucket)
    report.rate, report.cases_topic, report.text_server = rate, case_topics.requests, text_server
    models = [MODEL, TEXT_MODEL]
    prepare_topics_and_bucket(operator, models)
    start = _end_offsets(operator, [topics.results, case_topics.results])
    dead_letters_before = _dead_letters(operator, models)
    inferences_before, executions_before = _triton_counts(settings)
    invoices = _invoice_requests(count, run_id)
    case_requests = _case_requests(cases, run_id)
    logs = resolve(settings.stack.state_dir) / "logs"
    loop = asyncio.get_running_loop()
    with _worker_processes(settings, models, principals, logs) as workers:
        for worker in workers:
            served = " ".join(f"--model {model}" for model in worker.models)
            progress(
                f"started `sluiceway worker {served}` (pid {worker.service.pid}, "
                f"groups {', '.join(worker.group_ids)}, log {worker.service.log})"
            )
        for worker in workers:
            await loop.run_in_executor(None, worker.wait_until_assigned, operator)
        pace = f"{rate:,.0f} requests/s" if rate > 0 else "full speed"
        progress(
            f"publishing {count} SAP invoices to {topics.requests} and {cases} Salesforce cases "
            f"to {case_topics.requests} at {pace} (run {run_id})"
        )
        feeds = [(topics.requests, invoices), (case_topics.requests, case_requests)]
        wanted = {str(r.request_id) for r in [*invoices, *case_requests]}
        started = time.monotonic()
        # The reader runs while the feed publishes, so each result is timed when it arrives.
        reading = loop.run_in_executor(
            None, _read_results, client, start, wanted, RESULTS_TIMEOUT_S
        )
        sent_at = await loop.run_in_executor(None, _publish, client, feeds, rate)
        found = await reading
        report.seconds = time.monotonic() - started
        report.published, report.cases_published = count, cases
        pids = ", ".join(str(worker.service.pid) for worker in workers)
        progress(f"stopping the worker (SIGTERM drains it; pid {pids})")
    report.batches = sum(worker.counts.get("batches", 0) for worker in workers)
    report.commits = sum(worker.counts.get("commits", 0) for worker in workers)
    report.dead_lettered = _dead_letters(operator, models) - dead_letters_before
    _check_invoices(report, invoices, found, sent_at, settings)
    _check_cases(report, case_requests, found)
    inferences_after, executions_after = _triton_counts(settings)
    report.triton_inferences = inferences_after - inferences_before
    report.triton_executions = executions_after - executions_before
    report.running = [
        f"{row.name:<8} pid {row.pid}  {row.endpoint}  ({row.state})"
        for row in manager.status(settings)
        if row.pid is not None
    ]
    return report


def run_demo(
    settings: LocalSettings,
    count: int = DEFAULT_REQUESTS,
    progress: Progress = print,
    *,
    cases: int = DEFAULT_CASES,
    rate: float = DEFAULT_RATE,
    vllm_url: str | None = None,
    rollback_window_s: float | None = 3.0,
    principals: Principals | None = None,
) -> DemoReport:
    """Run one round trip of ``count`` invoices and ``cases`` support cases through the real
    worker, then (unless ``rollback_window_s`` is ``None``) the rollback story with monitor
    windows of that length; return what happened.

    ``principals``: on a secured broker, each process connects as its own principal (one
    worker process per model); ``None``: every process uses ``settings.kafka``.
    """
    with _vllm_endpoint(settings, vllm_url) as (served, label):
        progress(f"case_summary is served by {label}")
        report = asyncio.run(_run(served, count, cases, rate, label, progress, principals))
    if rollback_window_s is not None:
        progress("")
        progress("part 2: promote invoice_risk v2 and let the drift monitor judge it")
        report.story = run_rollback_story(
            settings, progress, window_s=rollback_window_s, principals=principals
        )
    return report


def _top_attributions(result_event: dict[str, Any]) -> str:
    explanation = result_event.get("explanation") or {}
    return ", ".join(
        f"{item['feature']} {item['value']:+.2f}" for item in explanation.get("attributions", [])
    )


def render_report(report: DemoReport) -> str:
    """A summary a person reads in ten seconds."""
    verdict = "OK" if report.ok else "FAILED"
    versions = ", ".join(f"v{v}: {n}" for v, n in sorted(report.versions.items()))
    answered = report.results_read + report.cases_summarised
    rate = answered / report.seconds if report.seconds else 0.0
    offered = f"{report.rate:,.0f}/s" if report.rate > 0 else "full speed"
    statuses = ", ".join(f"{name} {n}" for name, n in sorted(report.statuses.items()))
    p50, p95, p99 = (report.latency_percentile(q) for q in (50, 95, 99))
    lines = [
        f"Sluiceway demo {verdict}: SAP invoices and Salesforce cases -> Kafka -> worker -> "
        f"Triton / vLLM -> MinIO -> Kafka (run {report.run_id})",
        f"  published   {report.published} invoices to {report.requests_topic} and "
        f"{report.cases_published} cases to {report.cases_topic}, offered at {offered}; "
        f"every {EXPLAIN_EVERY}th asks for an explanation",
        f"  answered    {answered} in {report.seconds:.2f}s publish-to-last-result "
        f"({rate:,.0f} results/s); statuses: {statuses or 'none'}; "
        f"{report.dead_lettered} dead-lettered",
        f"  latency     invoices end to end (publish -> result read) p50 {p50:.1f} ms, "
        f"p95 {p95:.1f} ms, p99 {p99:.1f} ms; inside the worker p50 "
        f"{report.worker_percentile(50):.1f} ms, p99 {report.worker_percentile(99):.1f} ms",
        f"  scored      {report.results_correct} of {report.published} invoice scores match the "
        f"trained weights ({versions or 'none'}); {report.high_risk} at risk >= 0.5; Triton ran "
        f"{report.triton_inferences} rows in {report.triton_executions} executions, "
        f"{report.batches} micro-batches in all",
        f"  explained   {report.explained} invoices carry top-{TOP_K} attributions, "
        f"{report.explanations_where_asked} of {report.published} exactly as asked; "
        f"{report.faithful} of {report.faithfulness_checked} stored vectors add up to the "
        "score's logit gap from the baseline",
        f"  summarised  {report.cases_summarised} of {report.cases_published} cases by "
        f"{report.text_server}; token log-probs on "
        f"{report.cases_explained_where_asked} of {report.cases_published} exactly as asked",
        f"  stored      full results in s3://{report.bucket}/{MODEL}/ "
        f"({len(report.segments)} segment objects) and s3://{report.bucket}/{TEXT_MODEL}/ "
        f"({len(report.case_segments)}); each result event points at its byte range "
        + ("(checked)" if report.ranged_get_matched else "(DID NOT match)"),
    ]
    if report.sample:
        event = report.sample["result_event"]
        lines.append(
            f"  sample      invoice {report.sample['invoice']}: risk "
            f"{report.sample['score']:.3f}; top attributions: {_top_attributions(event)}"
        )
        lines.append("    result event:  " + json.dumps(event, default=str)[:400] + " ...")
        ref = event.get("payload_ref") or {}
        lines.append(
            f"    full record:   s3://{ref.get('bucket')}/{ref.get('key')} bytes "
            f"{ref.get('offset')}+{ref.get('length')}, all {len(FEATURES)} attributions: "
            + json.dumps(report.sample["segment_record"].get("attributions", {}))[:300]
        )
    if report.text_sample:
        lines.append(
            f"  sample      case {report.text_sample['case']}: "
            f"{report.text_sample['summary'][:120]!r}; first token log-probs: "
            f"{report.text_sample['token_logprobs']}"
        )
    if report.story is not None:
        lines.append(render_story(report.story))
    lines.append("Still running (stop with `make stack-down`; `make clean-state` also wipes data):")
    lines.extend(f"  {line}" for line in report.running or ["nothing"])
    lines.append(
        "  (the worker and monitor processes and the vLLM protocol server were started for "
        "this run and have stopped)"
    )
    return "\n".join(lines)
