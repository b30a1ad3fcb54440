"""Pidfile ownership, stopping process groups and waiting with a cut-off (fake clock)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from devkit.settings import load_local_settings
from devkit.stack.exceptions import PortInUseError
from devkit.stack.manager import _check_ports_free
from devkit.stack.process import ManagedProcess, port_open, wait_until
from tests.unit.fakes import FakeClock


def test_wait_until_gives_up_at_the_deadline() -> None:
    clock = FakeClock(0.0)
    assert not wait_until(lambda: False, 2.0, interval_s=0.5, clock=clock, sleep=clock.sleep)
    assert clock.now == 2.0
    assert clock.sleeps == [0.5] * 4


def test_wait_until_returns_as_soon_as_the_condition_holds() -> None:
    clock = FakeClock(0.0)
    assert wait_until(lambda: clock.now >= 1.0, 10.0, 0.25, clock=clock, sleep=clock.sleep)
    assert clock.now == 1.0


def test_wait_until_stops_early_when_aborted() -> None:
    clock = FakeClock(0.0)
    done = wait_until(lambda: False, 10.0, 0.25, clock, clock.sleep, abort=lambda: clock.now > 1)
    assert not done
    assert clock.now == 1.25


def _managed(tmp_path: Path, marker: str) -> ManagedProcess:
    return ManagedProcess("sleeper", tmp_path / "sleeper.pid", tmp_path / "sleeper.log", marker)


def test_started_process_is_ours_and_stop_ends_its_whole_group(tmp_path: Path) -> None:
    marker = str(tmp_path)
    process = _managed(tmp_path, marker)
    # A parent that starts a child in the same group: both must be gone after stop().
    script = "import subprocess,sys,time; subprocess.Popen(['sleep','300']); time.sleep(300)"
    pid = process.start([sys.executable, "-c", script, marker], dict(os.environ))
    assert process.running_pid() == pid
    assert process.stop(timeout_s=10)
    assert process.running_pid() is None
    assert not process.pidfile.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert "sluiceway starting sleeper" in process.log_tail()


def test_a_reused_pid_of_a_stranger_is_never_ours(tmp_path: Path) -> None:
    process = _managed(tmp_path, marker="/a/state/dir/nobody/uses")
    process.pidfile.write_text(f"{os.getpid()}\n")
    assert process.running_pid() is None
    assert not process.stop()
    os.kill(os.getpid(), 0)  # still alive: stop() signalled nothing


def test_taken_port_is_named_with_its_setting() -> None:
    from devkit.stack.services import KafkaService

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        assert port_open(port)
        service = KafkaService(load_local_settings(stack={"kafka_port": port}))
        with pytest.raises(PortInUseError) as caught:
            _check_ports_free(service)
    assert caught.value.port == port
    assert caught.value.setting == "SLUICEWAY_STACK__KAFKA_PORT"
