"""``sluiceway worker --processes 2`` on the real Kafka, MinIO and Triton: one supervisor, two
consumer-group members, one metrics endpoint; a child killed with SIGKILL is restarted and
nothing is lost or answered twice; SIGTERM drains both children and commits their offsets."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import ConsumerGroupState, KafkaException

from pipeline.kafka import clients
from pipeline.settings import Settings
from pipeline.topics import ModelTopics
from schemas.models import ResultStatus
from tests.integration import traffic
from tests.integration.local_ports import free_port
from tests.integration.test_worker import topics  # noqa: F401 (a fixture)
from tests.integration.waiting import wait_until
from workers.inference.worker import worker_group_id

BATCH = 600
STARTED = re.compile(r'child="(\d+)" pid="(\d+)" started')


@pytest.fixture
def supervisor(settings: Settings, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    process = traffic.start_worker(
        settings,
        tmp_path / "worker.log",
        SLUICEWAY_WORKERS__PROCESSES="2",
        SLUICEWAY_WORKERS__METRICS_PORT=str(port),
    )
    yield process, port
    if process.poll() is None:
        process.kill()
    process.wait(30)


def _children(log: Path) -> dict[int, int]:
    """Slot -> pid of the child last started in it, from the supervisor's log."""
    return {int(slot): int(pid) for slot, pid in STARTED.findall(log.read_text(errors="replace"))}


def _members(settings: Settings, group: str) -> frozenset[str] | None:
    """The member ids of ``group`` once it is stable and each member holds partitions."""
    admin = clients.admin(settings.kafka)
    with contextlib.suppress(KafkaException):
        described = admin.describe_consumer_groups([group], request_timeout=5)[group].result()
        if described.state == ConsumerGroupState.STABLE and all(
            member.assignment.topic_partitions for member in described.members
        ):
            return frozenset(member.member_id for member in described.members)
    return None


def _results_counted(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("sluiceway_results_total{")
    )


def test_two_processes_serve_once_survive_a_killed_child_and_drain_on_sigterm(
    settings: Settings,
    topics: ModelTopics,  # noqa: F811 (the fixture imported above)
    supervisor: tuple[subprocess.Popen[bytes], int],
    tmp_path: Path,
) -> None:
    process, port = supervisor
    log = tmp_path / "worker.log"
    group = worker_group_id(settings.namespace, "scaler")

    def two_members() -> frozenset[str] | None:
        members = _members(settings, group)
        return members if members is not None and len(members) == 2 else None

    wait_until(two_members, 60, "two children as members of the group", poll_s=0.5)
    first_members = two_members()
    requests = [traffic.scaler_request(i) for i in range(2 * BATCH)]
    traffic.publish_requests(settings, topics.requests, requests[:BATCH])
    got = traffic.collect(settings, topics.results, topics.dlq, BATCH, timeout_s=60)
    assert len({r.request_id for r in got.results}) == BATCH, log.read_text()

    # 1. SIGKILL one child: the supervisor starts another in its slot, which joins the group.
    # Only once the first half's offsets are committed: at least once lets a child killed
    # before its commit have its last requests served again, and this test counts each once.
    wait_until(
        lambda: (
            traffic.committed_offsets(settings, group, topics.requests, 3)
            == traffic.end_offsets(settings, topics.requests)
        ),
        30,
        "the first half's offsets committed",
    )
    killed = _children(log)[0]
    subprocess.run(["kill", "-9", str(killed)], check=True)
    wait_until(lambda: _children(log)[0] != killed, 30, "the killed child's replacement")
    wait_until(
        lambda: (members := two_members()) is not None and members != first_members,
        60,
        "the group stable again with the new child",
        poll_s=0.5,
    )
    assert process.poll() is None

    # 2. Both children serve the rest; nothing lost, nothing answered twice.
    traffic.publish_requests(settings, topics.requests, requests[BATCH:])
    got = traffic.collect(settings, topics.results, topics.dlq, 2 * BATCH, timeout_s=60)
    assert Counter(str(r.request_id) for r in got.results).keys() == {
        str(r.request_id) for r in requests
    }
    assert {r.status for r in got.results} == {ResultStatus.OK}
    assert got.dead_letters == []
    # One endpoint counts both children's results, the killed child's included.
    wait_until(lambda: _results_counted(port) == 2 * BATCH, 15, "metrics of all children")

    # 3. SIGTERM: both children drain and exit 0, offsets committed to the end.
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, log.read_text()
    stopped = re.findall(r'child="\d+" pid="\d+" stopped rc="(-?\d+)"', log.read_text())
    assert stopped == ["0", "0"]
    assert log.read_text().splitlines()[-1].endswith("processes=2")
    assert traffic.committed_offsets(settings, group, topics.requests, 3) == traffic.end_offsets(
        settings, topics.requests
    )
    # Every result message on the topic is one of a distinct request: no duplicate.
    assert sum(traffic.end_offsets(settings, topics.results).values()) == 2 * BATCH
