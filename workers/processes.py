"""Running a Sluiceway service (``sluiceway worker``, ``sluiceway monitor``) as its own process.

The child gets exactly the parent's settings through ``SLUICEWAY_*`` variables (plus the
``extra_environment`` it is given, e.g. a connector's secret), writes to its own log file,
and is stopped with SIGTERM (which drains it) when the ``with`` block ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pipeline.settings import KafkaSettings, Settings

STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Principals:
    """On a secured broker, who each process of a run is: one principal per process kind.

    Only the Kafka settings differ between them; everything else is the run's settings.
    """

    operator: KafkaSettings
    """What an operator does: create topics, issue control events, watch drift, control and
    consumer groups (the local stack's ``admin``)."""
    client: KafkaSettings
    """The feeds: publish requests and labels, read results, as the SDK would."""
    monitor: KafkaSettings
    workers: Mapping[str, KafkaSettings]
    """By model: each model's worker runs as its own process under its own principal."""


def as_principal(settings: Settings, kafka: KafkaSettings) -> Settings:
    """``settings`` connecting to Kafka as the principal of ``kafka``."""
    return settings.model_copy(update={"kafka": kafka})


class ServiceProcess:
    def __init__(
        self,
        settings: Settings,
        args: list[str],
        log: Path,
        extra_environment: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.args = args
        self.log = log
        self.extra_environment = dict(extra_environment or {})
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> ServiceProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        environment = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEWAY_")}
        environment.update(self.settings.as_environment())
        environment.update(self.extra_environment)
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sluiceway", *self.args],
                env=environment,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal the process and wait for it (killing it after ``STOP_TIMEOUT_S``)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def tail(self, lines: int = 15) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
