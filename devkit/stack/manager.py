"""``up``, ``down``, ``status`` and ``logs`` over the native stack's services.

``up`` is idempotent: a service whose recorded process is alive, ours and healthy is reused
as it is; anything else is (re)started. ``down`` stops only processes the stack recorded.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Literal

from devkit.settings import LocalSettings
from devkit.stack.exceptions import HealthTimeoutError, PortInUseError, StackError
from devkit.stack.installers import Progress
from devkit.stack.process import port_open, wait_until
from devkit.stack.services import Service, all_services

State = Literal["healthy", "starting", "unhealthy", "stopped"]


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: State
    pid: int | None
    version: str
    endpoint: str
    reused: bool = False


def _status_of(service: Service, *, reused: bool = False) -> ServiceStatus:
    pid = service.process.running_pid()
    if pid is None:
        state: State = "stopped"
    else:
        state = "healthy" if service.healthy() else "unhealthy"
    version = service.version() if state == "healthy" else "-"
    return ServiceStatus(service.name, state, pid, version, service.endpoint(), reused)


def _check_ports_free(service: Service) -> None:
    for port in service.ports():
        if port_open(port.number):
            raise PortInUseError(service.name, port.number, port.setting)


def _start(service: Service, progress: Progress) -> None:
    _check_ports_free(service)
    try:
        launch = service.prepare()
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or b"").decode(errors="replace").strip()
        last = detail.splitlines()[-1] if detail else f"exit code {exc.returncode}"
        raise StackError(f"{service.name}: preparing storage failed: {last}") from exc
    pid = service.process.start(launch.argv, launch.env)
    progress(f"started {service.name} (pid {pid}), log: {service.process.logfile}")


def _await_healthy(service: Service, timeout_s: float) -> None:
    def died() -> bool:
        return service.process.running_pid() is None

    if wait_until(service.healthy, timeout_s, abort=died):
        return
    why = "exited during start-up" if died() else f"was not healthy after {timeout_s:.0f}s"
    tail = service.process.log_tail(5).replace("\n", " | ")
    raise HealthTimeoutError(
        f"{service.name} {why}; log {service.process.logfile}: {tail or '(empty)'}"
    )


def up(settings: LocalSettings, progress: Progress = print) -> list[ServiceStatus]:
    """Bring every service up (reusing healthy ones) and return their status.

    1. Install what the cache lacks (Kafka jars, MinIO binary, Triton venv).
    2. For each service: reuse it if our process runs; otherwise check its ports and start it.
    3. Wait, with a cut-off, until every service answers its health check.
    4. Let each service set up what only its running server can (secured MinIO: the
       encrypted bucket and the scoped credentials).
    """
    services = all_services(settings)
    # Step 1.
    for service in services:
        service.install(progress)
    # Step 2.
    reused: set[str] = set()
    for service in services:
        if service.process.running_pid() is not None:
            reused.add(service.name)
            continue
        _start(service, progress)
    # Step 3.
    for service in services:
        _await_healthy(service, settings.stack.start_timeout_s)
    # Step 4.
    for service in services:
        service.configure(progress)
    return [_status_of(service, reused=service.name in reused) for service in services]


def down(settings: LocalSettings, progress: Progress = print) -> list[str]:
    """Stop the processes this stack started, last started first; return their names."""
    stopped = []
    for service in reversed(all_services(settings)):
        if service.process.stop():
            progress(f"stopped {service.name}")
            stopped.append(service.name)
    return stopped


def status(settings: LocalSettings) -> list[ServiceStatus]:
    return [_status_of(service) for service in all_services(settings)]


def logs(settings: LocalSettings, service_name: str | None, lines: int) -> dict[str, str]:
    """Return the last ``lines`` of each service's log (or of one service's)."""
    services = all_services(settings)
    names = [service.name for service in services]
    if service_name is not None and service_name not in names:
        raise StackError(f"unknown service {service_name!r}; choose one of {', '.join(names)}")
    return {
        service.name: service.process.log_tail(lines)
        for service in services
        if service_name in (None, service.name)
    }
