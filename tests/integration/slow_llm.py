"""A real worker process serving a text model from the vLLM protocol server, whose answers
the test can slow down (``server.latency_s``): deadlines and priorities seen end to end."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer

import schemas
from devkit.servers.openai_server import OpenAIProtocolServer
from pipeline.kafka import clients
from pipeline.kafka.admin import control_topic_spec, ensure_topics, model_topic_specs
from pipeline.kafka.clients import ConsumerRole
from pipeline.settings import ModelSettings, Settings
from pipeline.storage.client import ensure_bucket, make_client
from pipeline.topics import ModelTopics
from schemas.models import InferenceRequest, InferenceResult, Inputs, TextInput
from tests.integration import scrape, traffic
from tests.integration.local_ports import free_port
from tests.integration.waiting import wait_for

MODEL = "slowllm"


def text_request(index: int, **fields: object) -> InferenceRequest:
    return InferenceRequest(
        request_id=uuid.uuid4(),
        model=MODEL,
        inputs=Inputs(text=TextInput(prompt=f"request number {index}")),
        **fields,
    )


@dataclass(frozen=True)
class Outcome:
    result: InferenceResult
    produced_at: float
    """Wall-clock seconds when the worker produced it (the record's broker timestamp)."""


@dataclass
class SlowLlmScene:
    settings: Settings
    topics: ModelTopics
    server: OpenAIProtocolServer
    worker: subprocess.Popen[bytes]
    log: Path
    results: Consumer
    metrics_port: int

    def publish(self, *requests: InferenceRequest) -> None:
        traffic.publish_requests(self.settings, self.topics.requests, requests)

    def outcomes(self, count: int, timeout_s: float) -> list[Outcome]:
        """The next ``count`` results on the results topic, in the order they were produced."""
        found: list[Outcome] = []

        def more() -> bool:
            message = self.results.poll(0.2)
            if message is not None and message.error() is None:
                result = schemas.decode(message.value() or b"", InferenceResult)
                found.append(Outcome(result, message.timestamp()[1] / 1000.0))
            return len(found) >= count

        wait_for(more, timeout_s, f"{count} results (worker log: {self.log})")
        return sorted(found, key=lambda outcome: outcome.produced_at)

    def consumed(self) -> float:
        """Records the worker has read so far (its own counter, warm-up included)."""
        return scrape.sample_total(self.metrics_port, "sluiceway_consumed_total")

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@contextlib.contextmanager
def slow_llm_scene(
    settings: Settings, tmp_path: Path, partitions: int = 1, **worker_env: str
) -> Iterator[SlowLlmScene]:
    """Start the protocol server and a worker for :data:`MODEL`; warm them up; stop both."""
    topics = ModelTopics(settings.namespace, MODEL)
    ensure_topics(
        settings.kafka,
        [control_topic_spec(settings.namespace), *model_topic_specs(topics, partitions)],
    )
    ensure_bucket(make_client(settings.object_store), settings.object_store.bucket)
    served = settings.model_copy(
        update={"models": {**settings.models, MODEL: ModelSettings(backend="vllm")}}
    )
    results = clients.consumer(
        settings.kafka, group_id=clients.throwaway_group("outcomes"), role=ConsumerRole.COMMITTED
    )
    results.subscribe([topics.results])
    log = tmp_path / "worker.log"
    metrics_port = free_port()
    with OpenAIProtocolServer((MODEL,), port=free_port()) as server:
        worker = traffic.start_worker(
            served,
            log,
            (MODEL,),
            SLUICEWAY_WORKERS__METRICS_PORT=str(metrics_port),
            SLUICEWAY_BACKENDS__VLLM__BASE_URL=server.base_url,
            **worker_env,
        )
        scene = SlowLlmScene(settings, topics, server, worker, log, results, metrics_port)
        try:
            scene.publish(text_request(-1))  # answered once the worker serves
            scene.outcomes(1, timeout_s=60)
            server.reset_stats()
            yield scene
        finally:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
            results.close()
