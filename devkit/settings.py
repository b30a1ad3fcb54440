"""The development wing's settings: the runtime tree plus where the local stack runs.

``sluiceway stack``, ``sluiceway demo``, ``sluiceway model`` and ``sluiceway acl`` read
:class:`LocalSettings`: everything :class:`~pipeline.settings.Settings` holds, a ``stack``
section (``SLUICEWAY_STACK__*``: ports, versions, where downloads are cached), and the demo's
models from ``devkit/demo/settings.yaml`` below any configuration file. Runtime processes read
the plain :class:`~pipeline.settings.Settings`: no stack section, and no model they were not
told about.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline.settings import Settings, SettingsSection, load_settings_as, read_settings_file

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The source checkout the development wing runs from; relative stack paths resolve against it."""
DEMO_SETTINGS_FILE = PROJECT_ROOT / "devkit" / "demo" / "settings.yaml"
"""The demo's models (``invoice_risk``, ``scaler``, ``case_summary``) and where its monitor
finds references: the base layer of :func:`load_local_settings`."""


def _demo_layer() -> tuple[str, dict[str, Any]]:
    data = read_settings_file(DEMO_SETTINGS_FILE)
    # The file's folders are the repository's, wherever a command runs from (and a child
    # process gets them whole).
    monitor = data.get("monitor")
    if isinstance(monitor, dict) and isinstance(monitor.get("reference_dir"), str):
        monitor["reference_dir"] = str(PROJECT_ROOT / monitor["reference_dir"])
    return str(DEMO_SETTINGS_FILE), data


_DEMO_CONNECTORS: dict[str, tuple[str, ...]] = {
    "sap": ("invoice_risk",),
    "salesforce": ("case_summary",),
}


class StackSettings(SettingsSection):
    """Where and how ``sluiceway stack`` runs the native Kafka, MinIO and Triton."""

    state_dir: Path = Path(".sluiceway")
    """Project-local folder for data, logs, pidfiles and generated configs."""
    cache_dir: Path = Path.home() / ".cache" / "sluiceway"
    """Downloads and builds shared by every checkout: Kafka jars, the MinIO binary, Triton."""
    kafka_version: str = "4.1.1"
    kafka_port: int = Field(default=9092, ge=1, le=65535)
    kafka_controller_port: int = Field(default=9093, ge=1, le=65535)
    kafka_mtls_port: int = Field(default=9094, ge=1, le=65535)
    """Secured stack only: TLS with a client certificate (mTLS); the port setting
    ``kafka_port`` then serves SASL_SSL with SCRAM-SHA-512."""
    kafka_oauth_port: int = Field(default=9095, ge=1, le=65535)
    """Secured stack only: SASL_SSL with OAUTHBEARER, JWTs signed by the stack's issuer."""
    kafka_connectors: dict[str, tuple[str, ...]] = Field(
        default_factory=lambda: _DEMO_CONNECTORS.copy()
    )
    """Secured stack only: connector name (its ``--name``) -> the models it serves, from
    which ``sluiceway acl plan|apply`` derives the principal ``connector-<name>``."""
    kafka_heap: str = "768m"
    minio_version: str = "v0.0.0-20260212201848-7aac2a2c5b7c"
    minio_port: int = Field(default=9000, ge=1, le=65535)
    minio_console_port: int = Field(default=9001, ge=1, le=65535)
    pytriton_version: str = "0.7.0"
    triton_python: Path = Path("/usr/bin/python3.11")
    """Interpreter for Triton's venv: the python backend stub links the system libpython3.11."""
    triton_http_port: int = Field(default=8000, ge=1, le=65535)
    triton_grpc_port: int = Field(default=8001, ge=1, le=65535)
    triton_metrics_port: int = Field(default=8002, ge=1, le=65535)
    model_repository: Path = Path("deploy/triton/models")
    start_timeout_s: float = Field(default=90.0, gt=0)
    secured: bool = False
    """Run the stack as production would: TLS from a CA the stack generates (under
    ``<state_dir>/secrets``), authenticated users, and authorisation (see docs/security.md)."""


class LocalSettings(Settings):
    """The runtime settings with the local stack's section, for the development wing."""

    stack: StackSettings = StackSettings()

    def as_environment(self) -> dict[str, str]:
        # A child is a runtime process (worker, monitor, connector): it reads plain Settings,
        # which have no stack section.
        environment = super().as_environment()
        environment.pop("SLUICEWAY_STACK", None)
        return environment


def load_local_settings(config_file: Path | str | None = None, **overrides: Any) -> LocalSettings:
    """Settings for the local stack and the demo: the demo's settings file, then the
    configuration file (``--config`` or ``SLUICEWAY_CONFIG``), the environment, ``overrides``."""
    return load_settings_as(LocalSettings, config_file, base_layers=(_demo_layer(),), **overrides)


def load_demo_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Runtime settings with the demo's models below the configuration file: what a worker,
    monitor or connector on the local stack reads."""
    return load_settings_as(Settings, config_file, base_layers=(_demo_layer(),), **overrides)
