"""The worker's policies against the in-memory Kafka (``tests/unit/memory_kafka.py``).

The real ``InferenceWorker`` runs here, with its real intake, dispatcher, batch server, sink
and committer; only Kafka, the object store and the backend are in memory. Each test runs in
well under a second or two, and waits for conditions with a timeout.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import pytest

import schemas
from pipeline.backends import BackendError, RowInput, RowOutput
from pipeline.backends.signature import ModelSignature
from pipeline.resilience import RetryPolicy
from pipeline.resilience.breaker import BreakerConfig
from pipeline.settings import ModelSettings, Settings, WorkerSettings
from pipeline.topics import ModelTopics
from schemas.models import (
    DeadLetter,
    InferenceRequest,
    InferenceResult,
    Inputs,
    ResultStatus,
    Tensor,
    TensorDatatype,
)
from tests.unit.memory_kafka import (
    MemoryBroker,
    MemoryConsumer,
    MemoryProducer,
    MemoryStore,
    NoControl,
    scaler_signature,
)
from workers.inference.worker import InferenceWorker, worker_group_id

NS = "t"
POISON = -999.0
"""A first feature the fake backend refuses, failing the whole batch as Triton does."""


class ScalerBackend:
    """Doubles its input, like the ``scaler`` model's version 1; can hold, fail or refuse."""

    endpoint = "memory-triton"

    def __init__(self) -> None:
        self.calls = 0
        self.rows_served = 0
        self.transient = False
        self.hold: Callable[[RowInput], bool] = lambda row: False
        self.released = asyncio.Event()

    async def infer(
        self,
        model: str,
        version: str | None,
        rows: Sequence[RowInput],
        *,
        time_left_s: float | None = None,
        priority: int | None = None,
    ) -> list[RowOutput | BackendError]:
        self.calls += 1
        if self.transient:
            raise BackendError("memory backend down", reason="backend_unavailable", transient=True)
        if any(self.hold(row) for row in rows):
            await self.released.wait()
        if any(float(row.tensors["x"][0, 0]) == POISON for row in rows):
            raise BackendError("bad input in batch", reason="backend_bad_request")
        self.rows_served += len(rows)
        return [RowOutput(tensors={"y": row.tensors["x"] * 2}) for row in rows]

    async def describe(self, model: str) -> ModelSignature:
        return scaler_signature()

    async def close(self) -> None:
        pass


def settings(**workers: Any) -> Settings:
    defaults: dict[str, Any] = {
        "max_batch_size": 8,
        "max_wait_ms": 1,
        "commit_interval_ms": 10,
        "drain_timeout_s": 5,
    }
    defaults.update(workers)
    scaler = ModelSettings(
        backend="triton", default_version="1", feature_order=("f0", "f1", "f2", "f3")
    )
    return Settings(
        namespace=NS,
        workers=WorkerSettings(**defaults),
        models={"scaler": scaler, "scaler_b": scaler},
    )


def request(value: float, **fields: Any) -> InferenceRequest:
    features = {"f0": value, "f1": 1.0, "f2": 2.0, "f3": 3.0}
    return InferenceRequest(
        request_id=uuid.uuid4(),
        model=fields.pop("model", "scaler"),
        inputs=Inputs(features=features),
        **fields,
    )


class Scene:
    """A memory broker with a model's topics, and workers on it."""

    def __init__(self, config: Settings, partitions: int = 2) -> None:
        self.settings = config
        self.broker = MemoryBroker()
        for model in config.models:
            topics = ModelTopics(NS, model)
            for name in (topics.requests, topics.batch, topics.results, topics.dlq):
                self.broker.create_topic(name, partitions)
        self.broker.create_topic(f"{NS}.control", 1)
        self.backend = ScalerBackend()
        self.store = MemoryStore()
        self.consumers: list[MemoryConsumer] = []

    def worker(self, models: Sequence[str] = ("scaler",), **kwargs: Any) -> InferenceWorker:
        def consumer(model: str, group: str) -> MemoryConsumer:
            made = MemoryConsumer(self.broker, group)
            self.consumers.append(made)
            return made

        return InferenceWorker(
            self.settings,
            models,
            {"triton": self.backend},
            self.store,
            consumer_factory=consumer,
            producer=MemoryProducer(self.broker),
            control=NoControl(),
            reply_topic_exists=self.broker.has_topic,
            lag=False,
            retry=kwargs.pop(
                "retry", RetryPolicy(max_attempts=2, base_delay_s=0.001, max_delay_s=0.01)
            ),
            **kwargs,
        )

    def publish(
        self, *requests: InferenceRequest, partition: int | None = None, model: str = "scaler"
    ) -> list[int]:
        offsets = []
        for index, one in enumerate(requests):
            target = index % 2 if partition is None else partition
            offsets.append(
                self.broker.append(
                    ModelTopics(NS, model).requests,
                    schemas.encode(one),
                    partition=target,
                    key=str(index),
                )
            )
        return offsets

    def publish_raw(self, value: bytes, partition: int = 0, **kwargs: Any) -> int:
        return self.broker.append(
            ModelTopics(NS, "scaler").requests, value, partition=partition, **kwargs
        )

    def results(self, model: str = "scaler") -> list[InferenceResult]:
        return [
            schemas.decode(m.value() or b"", InferenceResult)
            for m in self.broker.messages(ModelTopics(NS, model).results)
        ]

    def letters(self, model: str = "scaler") -> list[DeadLetter]:
        return [
            schemas.decode(m.value() or b"", DeadLetter)
            for m in self.broker.messages(ModelTopics(NS, model).dlq)
        ]

    def committed(self, model: str = "scaler") -> dict[tuple[str, int], int]:
        return self.broker.committed(worker_group_id(NS, model))

    def fully_committed(self, model: str = "scaler") -> bool:
        topic = ModelTopics(NS, model).requests
        ends = self.broker.end_offsets(topic)
        committed = self.committed(model)
        return all(committed.get((topic, p), 0) == end for p, end in ends.items())


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


async def stopped(worker: InferenceWorker, task: asyncio.Task[Any]) -> None:
    worker.stop()
    await asyncio.wait_for(task, 30)


def test_an_offset_is_committed_only_once_every_outcome_below_it_is_acknowledged() -> None:
    scene = Scene(settings(max_batch_size=1), partitions=1)
    scene.backend.hold = lambda row: float(row.tensors["x"][0, 0]) == 2.0

    async def scenario() -> None:
        worker = scene.worker()
        task = asyncio.create_task(worker.run())
        scene.publish(*(request(float(i)) for i in range(6)), partition=0)
        await until(lambda: len(scene.results()) == 5, "every result but the held one")
        topic = ModelTopics(NS, "scaler").requests
        await until(lambda: scene.committed().get((topic, 0)) == 2, "the commit up to offset 2")
        assert worker.tracker.pending_commits() == {}, "nothing past the held record to commit"
        assert worker.tracker.in_flight() == 1
        scene.backend.released.set()
        await until(scene.fully_committed, "the commit past the released record")
        await stopped(worker, task)
        assert sorted(
            float(np.frombuffer(r.outputs.tensors[0].data, "<f4")[0]) for r in scene.results()
        ) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]

    run(scenario)


def test_partitions_pause_while_the_breaker_is_open_and_resume_after() -> None:
    scene = Scene(settings())
    scene.backend.transient = True
    breaker = BreakerConfig(window_size=4, minimum_calls=2, open_wait_s=1.0, probe_calls=1)

    async def scenario() -> None:
        worker = scene.worker(breaker_config=breaker)
        task = asyncio.create_task(worker.run())
        scene.publish(*(request(float(i)) for i in range(10)))
        await until(lambda: len(scene.consumers) == 1, "the worker's group member")
        consumer = scene.consumers[0]
        await until(
            lambda: len(consumer.owned) == 4 and consumer.paused == consumer.owned,
            "every partition paused",
        )
        assert scene.results() == []
        assert scene.letters() == []
        scene.backend.transient = False
        await until(lambda: len(scene.results()) == 10, "every request served after the outage")
        await until(lambda: not consumer.paused, "partitions resumed")
        await until(scene.fully_committed, "offsets committed to the end")
        await stopped(worker, task)
        assert scene.letters() == [], "a transient outage never dead-letters"
        assert {r.status for r in scene.results()} == {ResultStatus.OK}

    run(scenario)


def test_revocation_drains_in_flight_work_and_the_new_owner_serves_each_record_once() -> None:
    scene = Scene(settings(max_batch_size=4))
    scene.backend.hold = lambda row: float(row.tensors["x"][0, 0]) < 8.0

    async def scenario() -> None:
        first = scene.worker()
        first_task = asyncio.create_task(first.run())
        requests = [request(float(i)) for i in range(40)]
        scene.publish(*requests)
        await until(lambda: scene.backend.calls >= 1, "a batch held in the backend")
        second = scene.worker()
        second_task = asyncio.create_task(second.run())
        await until(
            lambda: len(scene.consumers) == 2 and scene.consumers[0]._wanted is not None,
            "a rebalance",
        )
        scene.backend.released.set()
        await until(
            lambda: len(scene.results()) >= 40 and scene.fully_committed(), "every request answered"
        )
        await stopped(second, second_task)
        await stopped(first, first_task)
        served = Counter(str(r.request_id) for r in scene.results())
        assert set(served) == {str(r.request_id) for r in requests}
        assert max(served.values()) == 1, "a record served by both owners"

    run(scenario)


def test_a_record_requeued_after_its_partition_was_revoked_is_left_to_the_new_owner() -> None:
    scene = Scene(settings(max_batch_size=2, drain_timeout_s=0.3))
    scene.backend.transient = True
    breaker = BreakerConfig(window_size=100, minimum_calls=100)  # never opens: requeue loops

    async def scenario() -> None:
        first = scene.worker(breaker_config=breaker)
        first_task = asyncio.create_task(first.run())
        requests = [request(float(i)) for i in range(12)]
        scene.publish(*requests)
        await until(lambda: scene.backend.calls >= 4, "batches failing and requeued")
        second = scene.worker(breaker_config=breaker)
        second_task = asyncio.create_task(second.run())
        await until(
            lambda: len(scene.consumers) == 2 and len(scene.consumers[0].owned) == 2,
            "the first worker handed a partition over",
        )
        handed = {
            key for key in [("t.scaler.requests", 0), ("t.scaler.requests", 1)]
        } - scene.consumers[0].owned
        assert all(record.partition_key not in handed for record in _queued(first))
        scene.backend.transient = False
        await until(
            lambda: len(scene.results()) >= 12 and scene.fully_committed(), "every request answered"
        )
        await stopped(second, second_task)
        await stopped(first, first_task)
        served = Counter(str(r.request_id) for r in scene.results())
        assert len(served) == 12
        assert max(served.values()) == 1

    run(scenario)


def _queued(worker: InferenceWorker) -> list[Any]:
    return [
        p.item
        for queues in worker.dispatcher.batcher._queues.values()
        for q in queues.lanes.values()
        for p in q
    ]


def test_a_commit_refused_because_the_group_moved_on_does_not_stop_the_worker() -> None:
    scene = Scene(settings())
    scene.broker.refuse_next_commits(worker_group_id(NS, "scaler"), 3)

    async def scenario() -> None:
        worker = scene.worker()
        task = asyncio.create_task(worker.run())
        scene.publish(*(request(float(i)) for i in range(10)))
        await until(scene.fully_committed, "offsets committed after the refusals")
        assert not task.done()
        await stopped(worker, task)
        assert worker.stats.commits_refused == 3
        assert len(scene.results()) == 10

    run(scenario)


def test_two_workers_with_overlapping_models_share_one_group_per_model() -> None:
    scene = Scene(settings())

    async def scenario() -> None:
        both = scene.worker(["scaler", "scaler_b"])
        only = scene.worker(["scaler"])
        tasks = [asyncio.create_task(both.run()), asyncio.create_task(only.run())]
        await until(lambda: len(scene.consumers) == 3, "three group members")
        groups = Counter(consumer.group_id for consumer in scene.consumers)
        assert groups == {worker_group_id(NS, "scaler"): 2, worker_group_id(NS, "scaler_b"): 1}
        await until(
            lambda: all(
                len(c.owned) == 2 for c in scene.consumers if c.group_id.endswith(".scaler")
            ),
            "scaler's partitions split between the two workers",
        )
        requests = [request(float(i)) for i in range(30)]
        scene.publish(*requests)
        await until(
            lambda: len(scene.results()) >= 30 and scene.fully_committed(), "every request answered"
        )
        for worker, task in zip((only, both), tasks[::-1], strict=True):
            await stopped(worker, task)
        served = Counter(str(r.request_id) for r in scene.results())
        assert len(served) == 30
        assert max(served.values()) == 1
        assert both.stats.consumed > 0, "both served scaler"
        assert only.stats.consumed > 0, "both served scaler"
        assert both.stats.consumed + only.stats.consumed == 30

    run(scenario)


def test_hostile_records_each_end_in_one_outcome_and_neighbours_are_served() -> None:
    scene = Scene(settings(max_batch_size=8))
    scene.broker.create_topic(f"{NS}.replies.me", 1)

    def tensor_request(
        shape: list[int], datatype: TensorDatatype = TensorDatatype.FP32
    ) -> InferenceRequest:
        itemsize = {TensorDatatype.FP32: 4, TensorDatatype.FP64: 8}[datatype]
        count = int(np.prod(shape))
        tensor = Tensor(name="x", datatype=datatype, shape=shape, data=b"\0" * (count * itemsize))
        return InferenceRequest(
            request_id=uuid.uuid4(), model="scaler", inputs=Inputs(tensors=[tensor])
        )

    async def scenario() -> None:
        worker = scene.worker()
        task = asyncio.create_task(worker.run())
        good = [request(float(i), reply_to=f"{NS}.replies.me") for i in range(20)]
        hostile = {
            "poison_in_batch": request(POISON, reply_to=f"{NS}.replies.me"),
            "forged_reply_to": request(1.0, reply_to=f"{NS}.control"),
            "unknown_version": request(1.0, model_version="99"),
            "climbing_version": request(1.0, model_version="1/../x"),
            "pipe_version": request(1.0, model_version="a|b"),
            "wrong_shape": tensor_request([1, 5]),
            "wrong_dtype": tensor_request([1, 4], TensorDatatype.FP64),
            "wrong_model": request(1.0, model="other"),
        }
        scene.publish(*good[:10], partition=0)
        scene.publish(*hostile.values(), partition=0)
        scene.publish(*good[10:], partition=0)
        scene.publish_raw(os.urandom(64))
        scene.publish_raw(b"\xc3\x01" + os.urandom(40))
        scene.publish_raw(
            schemas.encode(good[0])[:-3], key=b"\xff\xfe", headers=[("k" * 300, b"\xff")] * 5000
        )
        total = 20 + len(hostile) + 3
        await until(
            lambda: (
                len(scene.results()) + len(scene.letters()) >= total and scene.fully_committed()
            ),
            "every outcome",
        )
        await stopped(worker, task)
        results = {str(r.request_id): r for r in scene.results()}
        letters = scene.letters()
        assert len(results) + len(letters) == total, "each record ends in exactly one outcome"
        assert all(results[str(g.request_id)].status is ResultStatus.OK for g in good)
        rejected = {
            code: results[str(hostile[code].request_id)].error_code
            for code in ("forged_reply_to", "unknown_version", "climbing_version", "pipe_version")
        }
        assert set(rejected.values()) == {"reply_to_not_allowed", "unknown_version"}
        reasons = Counter(letter.reason_code for letter in letters)
        assert reasons["backend_bad_request"] == 1, "bisection isolates the poisoned record"
        assert reasons["invalid_tensor"] == 2
        assert reasons["unknown_model"] == 1
        assert scene.broker.end_offsets(f"{NS}.control") == {0: 0}, "nothing written to control"
        replies = [
            schemas.decode(m.value() or b"", InferenceResult)
            for m in scene.broker.messages(f"{NS}.replies.me")
        ]
        poisoned = [r for r in replies if r.request_id == hostile["poison_in_batch"].request_id]
        assert [r.status for r in poisoned] == [ResultStatus.REJECTED], (
            "a dead-lettered request is told at once"
        )
        assert len(replies) == 21

    run(scenario)


@pytest.mark.parametrize("count", [3000])
def test_served_records_with_day_long_deadlines_leave_every_index(count: int) -> None:
    scene = Scene(settings(max_batch_size=64))

    async def scenario() -> None:
        worker = scene.worker()
        task = asyncio.create_task(worker.run())
        from datetime import UTC, datetime, timedelta

        tomorrow = datetime.now(UTC) + timedelta(hours=24)
        scene.publish(*(request(float(i), deadline=tomorrow) for i in range(count)))
        await until(
            lambda: len(scene.results()) >= count and scene.fully_committed(), "every request", 30
        )
        await stopped(worker, task)
        assert worker.dispatcher.batcher.deadline_index_size <= 64
        assert worker.tracker.in_flight() == 0
        assert len(worker.dispatcher) == 0

    run(scenario)
