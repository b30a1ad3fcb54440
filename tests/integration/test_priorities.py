"""Under a backlog, urgent requests overtake ordinary ones published before them."""

from __future__ import annotations

from pathlib import Path

from pipeline.settings import Settings
from schemas.models import ResultStatus
from tests.integration.slow_llm import slow_llm_scene, text_request
from tests.integration.waiting import wait_until

ORDINARY = 240
URGENT = 24


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def test_priority_9_requests_complete_before_priority_0_requests_published_before_them(
    settings: Settings, tmp_path: Path
) -> None:
    # One backend call at a time, each slow: the worker holds the whole backlog in memory
    # and the batcher's order decides who is served first.
    with slow_llm_scene(
        settings,
        tmp_path,
        SLUICEWAY_WORKERS__MAX_IN_FLIGHT_BATCHES="1",
        SLUICEWAY_WORKERS__MAX_BATCH_SIZE="8",
    ) as scene:
        scene.server.latency_s = 0.05
        # The backend holds the first call until the worker has read the whole backlog: the
        # urgent requests are then waiting beside the ordinary ones however fast or slow the
        # machine is, and only the batcher's order decides who is served first.
        scene.server.hold_after(0)
        ordinary = [text_request(i, priority=0) for i in range(ORDINARY)]
        urgent = [text_request(i, priority=9) for i in range(URGENT)]
        read_before = scene.consumed()
        scene.publish(*ordinary)
        scene.publish(*urgent)
        wait_until(
            lambda: scene.consumed() - read_before >= ORDINARY + URGENT,
            60,
            "the worker to read the whole backlog",
        )
        scene.server.release()

        outcomes = scene.outcomes(ORDINARY + URGENT, timeout_s=60)

        assert {o.result.status for o in outcomes} == {ResultStatus.OK}, scene.logs()
        position = {o.result.request_id: rank for rank, o in enumerate(outcomes)}
        assert set(position) == {r.request_id for r in ordinary + urgent}
        finished_ordinary = [float(position[r.request_id]) for r in ordinary]
        finished_urgent = [float(position[r.request_id]) for r in urgent]
        started = min(o.produced_at for o in outcomes)
        at = {o.result.request_id: o.produced_at - started for o in outcomes}
        for name, group in (("priority 9", urgent), ("priority 0", ordinary)):
            seconds = [at[r.request_id] for r in group]
            print(
                f"{name}: {len(group)} requests, completed p50 {_percentile(seconds, 0.5):.2f}s "
                f"p95 {_percentile(seconds, 0.95):.2f}s after the first outcome"
            )
        # Order, not timing: nearly every urgent request is answered before nearly every
        # ordinary one, though all ordinary ones were published first (the first ordinary
        # batch left before the urgent requests were read, and was held).
        assert _percentile(finished_urgent, 0.95) < _percentile(finished_ordinary, 0.05)
        assert _percentile(finished_urgent, 0.5) < _percentile(finished_ordinary, 0.05)
