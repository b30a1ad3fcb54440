"""``sluiceway worker --processes N``: N consumer-group members under one supervisor.

One worker process runs one asyncio loop, so it uses about one core. The supervisor starts
N children (each the plain ``sluiceway worker`` for the same models, so each is one member of
every model's consumer group) and:

1. serves one ``/metrics`` endpoint for all of them: prometheus-client's multiprocess mode,
   with ``PROMETHEUS_MULTIPROC_DIR`` a temporary directory that is removed at the end; the
   gauge files of a child that exited are removed, its counters stay in the totals. Beside it,
   ``/healthz`` (the supervisor's own loop turns) and ``/readyz`` (at least one child runs and
   the supervisor is not stopping): the children serve no endpoint of their own;
2. restarts a child that exits without being asked to, after a backoff that grows while a
   child keeps dying soon after its start (:class:`RestartBackoff`), so a crash loop waits
   instead of spinning;
3. on SIGTERM or SIGINT, sends SIGTERM to every child (each drains: in-flight batches finish,
   outcomes are produced, offsets committed), waits for them and exits 0 only if all did;
4. never outlives its own death: each child asks the kernel to kill it when the supervisor
   dies (``PR_SET_PDEATHSIG``), so ``kill -9`` of the supervisor stops everything at once, as
   it stops a single worker.

Each child's final counters are written to a file the supervisor sums into one
``worker stopped:`` line, the same line a single worker prints.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from pipeline.health import HealthState
from pipeline.metrics import serve

log = logging.getLogger(__name__)

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
POLL_INTERVAL_S = 0.2
"""How often the supervisor looks for exited children and due restarts."""
STOP_GRACE_S = 30.0
"""Beyond a child's own drain timeout, how long SIGTERM may take before SIGKILL."""
_PR_SET_PDEATHSIG = 1


class RestartBackoff:
    """When a child that exited may start again. Pure; the clock is passed in.

    The first unexpected exit restarts after ``initial_s``; each further exit of a child that
    ran less than ``stable_after_s`` doubles the wait, up to ``max_s``. A child that ran at
    least ``stable_after_s`` before it died starts over at ``initial_s``.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        initial_s: float = 0.5,
        max_s: float = 30.0,
        stable_after_s: float = 60.0,
    ) -> None:
        if initial_s <= 0 or max_s < initial_s:
            raise ValueError("backoff needs 0 < initial_s <= max_s")
        self._clock = clock
        self.initial_s = initial_s
        self.max_s = max_s
        self.stable_after_s = stable_after_s
        self._started: dict[int, float] = {}
        self._quick_exits: dict[int, int] = {}

    def started(self, slot: int) -> None:
        self._started[slot] = self._clock()

    def exited(self, slot: int) -> float:
        """Record an unexpected exit of ``slot``; return the time it may start again."""
        now = self._clock()
        ran_s = now - self._started.get(slot, now)
        quick = 0 if ran_s >= self.stable_after_s else self._quick_exits.get(slot, 0)
        self._quick_exits[slot] = quick + 1
        return now + min(self.initial_s * 2.0**quick, self.max_s)


@dataclass
class _Child:
    slot: int
    process: subprocess.Popen[bytes] | None = None
    restart_at: float | None = None
    exits: list[int] = field(default_factory=list)


class Supervisor:
    """Runs ``count`` children built by ``command(slot, stats_file)`` until stopped."""

    def __init__(
        self,
        command: Callable[[int, Path], list[str]],
        count: int,
        *,
        environment: Mapping[str, str],
        metrics_port: int | None,
        drain_timeout_s: float,
        metrics_address: str = "127.0.0.1",
        clock: Callable[[], float] = time.monotonic,
        backoff: RestartBackoff | None = None,
        scratch_parent: Path | None = None,
    ) -> None:
        if count < 1:
            raise ValueError("a supervisor runs at least one child")
        self._command = command
        self._environment = dict(environment)
        self._metrics_port = metrics_port
        self._metrics_address = metrics_address
        self.health = HealthState(clock=clock)
        self._stop_timeout_s = drain_timeout_s + STOP_GRACE_S
        self._clock = clock
        self._backoff = backoff or RestartBackoff(clock)
        self._children = [_Child(slot) for slot in range(count)]
        self._stopping = threading.Event()
        self._scratch_parent = scratch_parent
        self.restarts = 0

    def stop(self) -> None:
        self.health.stopping()
        self._stopping.set()

    def run(self) -> tuple[int, dict[str, int]]:
        """Supervise until :meth:`stop`; return (exit status, the children's summed counters)."""
        with tempfile.TemporaryDirectory(
            prefix="sluiceway-worker-", dir=self._scratch_parent
        ) as scratch:
            metrics_dir = Path(scratch) / "metrics"
            stats_dir = Path(scratch) / "stats"
            metrics_dir.mkdir()
            stats_dir.mkdir()
            self._environment[MULTIPROC_DIR_VARIABLE] = str(metrics_dir)
            if self._metrics_port is not None:
                serve_multiprocess_metrics(
                    self._metrics_port, metrics_dir, self._metrics_address, self.health
                )
            try:
                for child in self._children:
                    self._start(child, stats_dir)
                while not self._stopping.wait(POLL_INTERVAL_S):
                    self.health.loop_turned()
                    self._tend(metrics_dir, stats_dir)
                status = self._stop_all(metrics_dir)
            finally:
                self._kill_all()
            return status, summed_counters(stats_dir)

    def _start(self, child: _Child, stats_dir: Path) -> None:
        stats_file = stats_dir / f"child-{child.slot}-{len(child.exits)}.json"
        child.process = subprocess.Popen(
            self._command(child.slot, stats_file), env=self._environment
        )
        child.restart_at = None
        self._backoff.started(child.slot)
        self.health.assignment(f"child-{child.slot}", 1)
        log.info('child="%d" pid="%d" started', child.slot, child.process.pid)

    def _tend(self, metrics_dir: Path, stats_dir: Path) -> None:
        """Notice children that exited, and start again those whose backoff is over."""
        for child in self._children:
            process = child.process
            if process is not None and (code := process.poll()) is not None:
                child.exits.append(code)
                child.process = None
                self.health.assignment(f"child-{child.slot}", 0)
                forget_process_metrics(metrics_dir, process.pid)
                child.restart_at = self._backoff.exited(child.slot)
                log.warning(
                    'child="%d" pid="%d" exited rc="%d" restart_in_s="%.1f"',
                    child.slot,
                    process.pid,
                    code,
                    child.restart_at - self._clock(),
                )
            due = child.restart_at is not None and self._clock() >= child.restart_at
            if child.process is None and due and not self._stopping.is_set():
                self.restarts += 1
                self._start(child, stats_dir)

    def _stop_all(self, metrics_dir: Path) -> int:
        """SIGTERM to every child, then wait for each: 0 if every child drained cleanly."""
        running = [child for child in self._children if child.process is not None]
        for child in running:
            assert child.process is not None
            child.process.send_signal(signal.SIGTERM)
        deadline = self._clock() + self._stop_timeout_s
        status = 0
        for child in running:
            process = child.process
            assert process is not None
            try:
                code = process.wait(timeout=max(deadline - self._clock(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
            child.process = None
            forget_process_metrics(metrics_dir, process.pid)
            log.info('child="%d" pid="%d" stopped rc="%d"', child.slot, process.pid, code)
            status = status or (0 if code == 0 else 1)
        return status

    def _kill_all(self) -> None:
        for child in self._children:
            if child.process is not None and child.process.poll() is None:
                child.process.kill()
                child.process.wait()


def serve_multiprocess_metrics(
    port: int, directory: Path, address: str, health: HealthState
) -> None:
    """``/metrics`` summing what every child wrote under ``directory``, and ``health``."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    serve(registry, port, address, health)


def forget_process_metrics(directory: Path, pid: int) -> None:
    """Drop a dead child's gauges (a gauge of a process that is gone says nothing now); its
    counters and histograms stay, so totals never go down."""
    for gauge_file in directory.glob(f"gauge_*_{pid}.db"):
        gauge_file.unlink(missing_ok=True)


def summed_counters(stats_dir: Path) -> dict[str, int]:
    """The children's final counters (one JSON object of integers per child run), summed."""
    totals: dict[str, int] = {}
    for path in sorted(stats_dir.glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            counters = json.loads(path.read_text())
            if not isinstance(counters, dict):
                continue
            for name, value in counters.items():
                if isinstance(value, int):
                    totals[name] = totals.get(name, 0) + value
    return totals


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere a no-op).

    If the parent is already gone (it died before this ran), exit at once.
    """
    name = ctypes.util.find_library("c")
    if name is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(name, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def run_supervisor(
    command: Callable[[int, Path], list[str]],
    count: int,
    *,
    environment: Mapping[str, str],
    metrics_port: int | None,
    metrics_address: str,
    drain_timeout_s: float,
) -> tuple[int, dict[str, int]]:
    """Run a :class:`Supervisor` in the main thread; SIGTERM and SIGINT stop it."""
    supervisor = Supervisor(
        command,
        count,
        environment=environment,
        metrics_port=metrics_port,
        metrics_address=metrics_address,
        drain_timeout_s=drain_timeout_s,
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        supervisor.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    return supervisor.run()


def child_arguments(
    models: Sequence[str], log_level: str, slot: int, stats_file: Path
) -> list[str]:
    """The command line of child ``slot``: a single worker that reports to this supervisor."""
    served = [argument for model in models for argument in ("--model", model)]
    return [
        *(sys.executable, "-m", "sluiceway", "worker", "--processes", "1", *served),
        "--log-level",
        log_level,
        "--supervisor-pid",
        str(os.getpid()),
        "--slot",
        str(slot),
        "--stats-file",
        str(stats_file),
    ]
