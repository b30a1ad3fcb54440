"""The worker supervisor: restart backoff with a fake clock; children as tiny real processes."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.settings import Settings, WorkerSettings
from sluiceway import build_parser
from sluiceway.worker_cmd import child_settings, process_count
from tests.integration.waiting import wait_until
from tests.unit.fakes import FakeClock
from workers.supervisor import (
    RestartBackoff,
    Supervisor,
    child_arguments,
    forget_process_metrics,
    summed_counters,
)


def _backoff(clock: FakeClock) -> RestartBackoff:
    return RestartBackoff(clock, initial_s=0.5, max_s=4.0, stable_after_s=60.0)


def test_a_crash_loop_waits_longer_each_time_up_to_the_cap() -> None:
    clock = FakeClock()
    backoff = _backoff(clock)
    waits = []
    for _ in range(6):
        backoff.started(0)
        clock.advance(1.0)  # dies a second after each start
        waits.append(backoff.exited(0) - clock())
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_a_child_that_ran_long_enough_restarts_after_the_first_wait_again() -> None:
    clock = FakeClock()
    backoff = _backoff(clock)
    for _ in range(3):
        backoff.started(0)
        backoff.exited(0)
    backoff.started(0)
    clock.advance(60.0)
    assert backoff.exited(0) - clock() == 0.5


def test_slots_back_off_independently() -> None:
    clock = FakeClock()
    backoff = _backoff(clock)
    for _ in range(3):
        backoff.started(0)
        backoff.exited(0)
    backoff.started(1)
    assert backoff.exited(1) - clock() == 0.5


@pytest.mark.parametrize(("initial_s", "max_s"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 5.0)])
def test_backoff_refuses_nonsense_bounds(initial_s: float, max_s: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        RestartBackoff(FakeClock(), initial_s=initial_s, max_s=max_s)


def test_counters_of_every_child_run_are_summed_and_unreadable_files_are_skipped(
    tmp_path: Path,
) -> None:
    (tmp_path / "child-0-0.json").write_text(json.dumps({"results": 3, "commits": 1}))
    (tmp_path / "child-0-1.json").write_text(json.dumps({"results": 4, "note": "x"}))
    (tmp_path / "child-1-0.json").write_text("{torn")
    (tmp_path / "child-2-0.json").write_text(json.dumps([1, 2]))
    assert summed_counters(tmp_path) == {"results": 7, "commits": 1}


def test_a_dead_childs_gauges_go_and_its_counters_stay(tmp_path: Path) -> None:
    names = ["gauge_all_41.db", "gauge_livesum_41.db", "counter_41.db", "gauge_all_42.db"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    forget_process_metrics(tmp_path, 41)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_41.db", "gauge_all_42.db"]


# Children: a crashing one (exits 3 at once on its first run) and one that waits for SIGTERM.
_CHILD = """
import pathlib, signal, sys, threading
stats, slot = pathlib.Path(sys.argv[1]), int(sys.argv[2])
if slot == 0 and stats.name.endswith("-0.json"):
    sys.exit(3)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stats.with_suffix(".ready").write_text("")
stop.wait(30)
stats.write_text('{"results": %d}' % (10 + slot))
"""


def test_a_child_that_dies_is_restarted_and_sigterm_drains_all(tmp_path: Path) -> None:
    def command(slot: int, stats_file: Path) -> list[str]:
        return [sys.executable, "-c", _CHILD, str(stats_file), str(slot)]

    supervisor = Supervisor(
        command,
        2,
        environment={},
        metrics_port=None,
        drain_timeout_s=5.0,
        backoff=RestartBackoff(time.monotonic, initial_s=0.01, max_s=0.01),
        scratch_parent=tmp_path,
    )
    outcome: list[tuple[int, dict[str, int]]] = []
    runner = threading.Thread(target=lambda: outcome.append(supervisor.run()))
    runner.start()
    try:
        wait_until(
            lambda: len(list(tmp_path.glob("*/stats/*.ready"))) == 2,
            timeout_s=20,
            what="both children running (one of them restarted)",
        )
        assert supervisor.health.liveness().ok
        assert supervisor.health.readiness().ok
    finally:
        supervisor.stop()
        runner.join(30)
    assert "stopping" in supervisor.health.readiness().reasons
    status, counters = outcome[0]
    assert status == 0
    assert supervisor.restarts == 1
    assert counters == {"results": 10 + 11}
    assert list(tmp_path.iterdir()) == []  # the scratch directory is gone


def test_a_childs_command_line_is_a_single_worker_reporting_to_this_supervisor(
    tmp_path: Path,
) -> None:
    command = child_arguments(["scaler", "invoice_risk"], "DEBUG", 3, tmp_path / "c.json")
    assert command[:3] == [sys.executable, "-m", "sluiceway"]
    args = build_parser().parse_args(command[3:])
    assert args.model == ["scaler", "invoice_risk"]
    assert (args.processes, args.slot, args.log_level) == (1, 3, "DEBUG")
    assert args.supervisor_pid == os.getpid()
    assert args.stats_file == tmp_path / "c.json"


@pytest.mark.parametrize(
    ("flag", "setting", "expected"), [(3, None, 3), (None, 5, 5), (None, None, os.cpu_count())]
)
def test_the_process_count_comes_from_the_flag_then_the_setting_then_the_cores(
    flag: int | None, setting: int | None, expected: int
) -> None:
    settings = Settings(workers=WorkerSettings(processes=setting))
    assert process_count(flag, settings) == expected


def test_each_child_has_ids_of_its_own_stable_per_slot() -> None:
    static = Settings(workers=WorkerSettings(worker_id="pod-7", group_instance_id="pod-7"))
    first, second = (child_settings(static, 4242, slot).workers for slot in (0, 1))
    assert (first.worker_id, first.group_instance_id) == ("pod-7-0", "pod-7-0")
    assert (second.worker_id, second.group_instance_id) == ("pod-7-1", "pod-7-1")
    assert child_settings(static, 999, 1).workers == second  # a restarted child: the same ids

    dynamic = child_settings(Settings(), 4242, 2).workers
    assert dynamic.worker_id.endswith("-4242-2")
    assert not dynamic.group_instance_id
