"""The broker is a real Apache Kafka: clients, consumer groups and faust-streaming use it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Consumer, Message, TopicPartition

from pipeline.kafka import clients
from pipeline.kafka.clients import ConsumerRole, ProducerRole
from pipeline.settings import Settings
from tests.integration.waiting import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]


def _produce(settings: Settings, topic: str, values: list[bytes]) -> None:
    producer = clients.producer(settings.kafka, role=ProducerRole.FEED)
    errors: list[object] = []
    for index, value in enumerate(values):
        producer.produce(
            topic,
            key=f"k{index}".encode(),
            value=value,
            on_delivery=lambda err, _msg: errors.append(err) if err else None,
        )
    assert producer.flush(15) == 0
    assert errors == []


def _consumer(settings: Settings, group: str) -> Consumer:
    return clients.consumer(settings.kafka, group_id=group, role=ConsumerRole.COMMITTED)


def test_confluent_kafka_round_trip_keeps_every_message_and_offset(
    settings: Settings, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(partitions=3)
    values = [f"request-{i}".encode() for i in range(300)]
    _produce(settings, topic, values)

    consumer = _consumer(settings, f"{topic}-group")
    consumer.subscribe([topic])
    received: list[Message] = []
    wait_for(
        lambda: (
            received.extend(m for m in consumer.consume(100, 1.0) if not m.error())
            or len(received) >= len(values)
        ),
        30,
        "300 messages",
    )
    consumer.commit(asynchronous=False)

    assert sorted(m.value() for m in received) == sorted(values)
    by_partition: dict[int, list[int]] = {}
    for message in received:
        by_partition.setdefault(message.partition(), []).append(message.offset())
    # Offsets are contiguous from zero in every partition: nothing lost or duplicated.
    for offsets in by_partition.values():
        assert offsets == list(range(len(offsets)))
    committed = consumer.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
    assert {tp.partition: tp.offset for tp in committed} == {
        p: len(by_partition.get(p, [])) for p in range(3)
    }
    consumer.close()


def test_consumer_group_rebalance_splits_partitions_between_members(
    settings: Settings, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(partitions=4)
    group = f"{topic}-group"
    assignments: dict[str, set[int]] = {"a": set(), "b": set()}

    def tracker(name: str) -> dict[str, Callable[..., None]]:
        def on_assign(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
            assignments[name] = {tp.partition for tp in partitions}

        def on_revoke(_consumer: Consumer, _partitions: list[TopicPartition]) -> None:
            assignments[name] = set()

        return {"on_assign": on_assign, "on_revoke": on_revoke}

    first, second = _consumer(settings, group), _consumer(settings, group)
    first.subscribe([topic], **tracker("a"))
    received: dict[str, list[bytes]] = {"a": [], "b": []}

    def poll_both() -> None:
        for name, consumer in (("a", first), ("b", second)):
            message = consumer.poll(0.2)
            if message is not None and not message.error():
                received[name].append(message.value())

    wait_for(lambda: first.poll(0.2) is None and assignments["a"] == {0, 1, 2, 3}, 30, "a alone")
    second.subscribe([topic], **tracker("b"))
    wait_for(
        lambda: poll_both() or (len(assignments["a"]) == 2 and len(assignments["b"]) == 2),
        60,
        "the rebalance to give each member two partitions",
    )
    assert assignments["a"] | assignments["b"] == {0, 1, 2, 3}
    assert not assignments["a"] & assignments["b"]

    values = [f"after-rebalance-{i}".encode() for i in range(100)]
    _produce(settings, topic, values)
    wait_for(
        lambda: poll_both() or len(received["a"]) + len(received["b"]) >= 100,
        30,
        "both members to consume their share",
    )
    # Every message reached exactly one member, and both members did work.
    assert sorted(received["a"] + received["b"]) == sorted(values)
    assert received["a"]
    assert received["b"]
    first.close()
    second.close()


def test_faust_streaming_agent_consumes_and_produces_on_the_broker(
    settings: Settings, new_topic: Callable[..., str]
) -> None:
    source, sink = new_topic(partitions=1, prefix="faust-in"), new_topic(1, prefix="faust-out")
    env = dict(
        os.environ,
        FAUST_ECHO_BROKER=f"kafka://{settings.kafka.bootstrap_servers}",
        FAUST_ECHO_SOURCE=source,
        FAUST_ECHO_SINK=sink,
        FAUST_ECHO_APP=f"echo-{source}",
    )
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "faust",
            "-A",
            "tests.integration.faust_echo_app",
            "worker",
            "-l",
            "warn",
            "--without-web",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        values = [f"event-{i}".encode() for i in range(20)]
        _produce(settings, source, values)
        consumer = _consumer(settings, f"{sink}-reader")
        consumer.subscribe([sink])
        echoed: list[bytes] = []
        wait_for(
            lambda: (
                echoed.extend(m.value() for m in consumer.consume(20, 1.0) if not m.error())
                or len(echoed) >= 20
                or worker.poll() is not None
            ),
            90,
            "the faust agent's 20 outputs",
        )
        consumer.close()
        assert worker.poll() is None, "the faust worker exited early"
        assert sorted(echoed) == sorted(value.upper() for value in values)
    finally:
        worker.terminate()
        output, _ = worker.communicate(timeout=30)
    assert b"Traceback" not in output, output.decode(errors="replace")[-2000:]
