"""Errors of the native local stack. Each message is one line a person can act on."""

from __future__ import annotations

from schemas.errors import SluicewayError


class StackError(SluicewayError):
    """Something in ``sluiceway stack`` failed."""


class PortInUseError(StackError):
    """A port the stack needs is taken by a process the stack did not start."""

    def __init__(self, service: str, port: int, setting: str) -> None:
        super().__init__(
            f"{service}: port {port} is already in use by another process; stop that process "
            f"or choose another port with {setting}"
        )
        self.service = service
        self.port = port
        self.setting = setting


class ToolMissingError(StackError):
    """A prerequisite program (java, mvn, go, python3.11) is not installed."""


class InstallError(StackError):
    """Downloading or building a service failed; the message names the log to read."""


class HealthTimeoutError(StackError):
    """A service started but did not become healthy in time."""
