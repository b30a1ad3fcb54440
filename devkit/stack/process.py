"""Starting, finding and stopping the stack's own processes through pidfiles.

A pidfile alone is not proof of ownership: pids are reused. A process counts as ours only
when its command line still contains the marker we started it with (the absolute path of its
state folder), so ``down`` never signals a stranger.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

Clock = Callable[[], float]
Sleep = Callable[[float], None]


@dataclass(frozen=True)
class ManagedProcess:
    """Where one service keeps its pidfile and log, and how to recognise its process."""

    name: str
    pidfile: Path
    logfile: Path
    marker: str

    def read_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None

    def running_pid(self) -> int | None:
        """Return the pid if the recorded process is alive and still ours, else ``None``."""
        pid = self.read_pid()
        if pid is None:
            return None
        cmdline = _cmdline(pid)
        if cmdline is None:
            return None
        if self.marker.encode() not in cmdline:
            return None
        return pid

    def start(self, argv: Sequence[str], env: Mapping[str, str]) -> int:
        """Start ``argv`` detached, in its own session, appending its output to the log.

        The server is spawned rather than held as a ``Popen`` child: it outlives the command
        that started it, and ``down`` finds it again through the pidfile.
        """
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        with self.logfile.open("ab") as log:
            log.write(f"\n=== sluiceway starting {self.name}: {' '.join(argv)}\n".encode())
        pid = os.posix_spawnp(
            argv[0],
            list(argv),
            dict(env),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(self.logfile), os.O_WRONLY | os.O_APPEND, 0),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,
        )
        self.pidfile.write_text(f"{pid}\n", encoding="ascii")
        return pid

    def stop(
        self,
        timeout_s: float = 20.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
    ) -> bool:
        """Stop our process group: SIGTERM, then SIGKILL after ``timeout_s``.

        Returns whether a process of ours was running.
        """
        pid = self.running_pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return False
        _signal_group(pid, signal.SIGTERM)
        deadline = clock() + timeout_s
        while _group_alive(pid) and clock() < deadline:
            sleep(0.1)
        if _group_alive(pid):
            _signal_group(pid, signal.SIGKILL)
            while _group_alive(pid) and clock() < deadline + 5.0:
                sleep(0.05)
        self.pidfile.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.logfile.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def _group_alive(pgid: int) -> bool:
    # A zombie leader still counts as a member, so reap it if it is our direct child.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _has_live_member(pgid)


def _has_live_member(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, process_group = fields[0], int(fields[2])
        if process_group == pgid and state != "Z":
            return True
    return False


def port_open(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    """Return whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_until(
    condition: Callable[[], bool],
    timeout_s: float,
    interval_s: float = 0.25,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    abort: Callable[[], bool] = lambda: False,
) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; stop early when ``abort``."""
    deadline = clock() + timeout_s
    while True:
        if condition():
            return True
        if abort() or clock() >= deadline:
            return False
        sleep(interval_s)


def _cmdline(pid: int, exec_grace_s: float = 2.0) -> bytes | None:
    """The process's argv as the kernel shows it, or ``None`` when it is gone.

    A child that was just spawned shows an empty command line for a moment: the spawn returns
    as soon as the exec has begun, before the kernel has set up the new argument area.
    """
    deadline = time.monotonic() + exec_grace_s
    while True:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if cmdline or time.monotonic() > deadline:
            return cmdline
        time.sleep(0.005)
