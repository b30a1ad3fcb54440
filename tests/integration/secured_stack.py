"""A secured native stack (``stack.secured``) for integration tests, and each principal's view.

The session fixture :func:`secured_stack` starts Kafka, MinIO and Triton in a temporary state
folder on ports of their own (``SLUICEWAY_TEST_SECURED_PORT_BASE``, default 29000; see
:func:`secured_ports`), which ``sluiceway stack up`` gives its CA, users and ACLs; it stops
them at the end. Tests then connect as a principal:

* :meth:`SecuredStack.principal_settings` -- ``Settings`` whose ``kafka`` section logs in as
  the principal (what ``sluiceway stack credentials`` prints), for product code;
* :meth:`SecuredStack.librdkafka_config` -- a raw confluent-kafka configuration for any of the
  three mechanisms, for tests that probe the broker directly;
* :meth:`SecuredStack.for_namespace` -- the same ACLs for a namespace of the test's own.

Registered in ``tests/integration/conftest.py``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devkit.settings import LocalSettings, load_local_settings
from devkit.stack import manager
from devkit.stack.kafka_security import (
    Mechanism,
    admin_kafka_settings,
    apply_stack_acls,
    credential_environment,
)
from devkit.stack.oauth import ensure_issuer
from devkit.stack.secrets import KafkaSecrets
from pipeline.settings import KafkaSettings, Settings

PORT_BASE_ENV = "SLUICEWAY_TEST_SECURED_PORT_BASE"
DEFAULT_PORT_BASE = 29000


def secured_ports(base: int) -> dict[str, int]:
    """The stack's ports from one base: MinIO at base+0/1, Kafka at base+92..95 (SCRAM,
    controller, mTLS, OAUTHBEARER) and Triton at base+800..802, as the defaults are laid out
    from 9000, 9092 and 8000."""
    return {
        "minio_port": base,
        "minio_console_port": base + 1,
        "kafka_port": base + 92,
        "kafka_controller_port": base + 93,
        "kafka_mtls_port": base + 94,
        "kafka_oauth_port": base + 95,
        "triton_http_port": base + 800,
        "triton_grpc_port": base + 801,
        "triton_metrics_port": base + 802,
    }


def secured_settings(state_dir: Path, base: int, **overrides: Any) -> LocalSettings:
    """Settings of a secured stack in ``state_dir`` (its services' endpoints, no Kafka login)."""
    ports = secured_ports(base)
    return load_local_settings(
        stack={"secured": True, "state_dir": str(state_dir), **ports},
        kafka={"bootstrap_servers": f"127.0.0.1:{ports['kafka_port']}"},
        object_store={
            "endpoint": f"127.0.0.1:{ports['minio_port']}",
            "secure": True,
            "ca_location": str(state_dir / "secrets" / "ca.pem"),
        },
        backends={
            "triton": {
                "http_url": f"127.0.0.1:{ports['triton_http_port']}",
                "grpc_url": f"127.0.0.1:{ports['triton_grpc_port']}",
            }
        },
        **overrides,
    )


@dataclass(frozen=True)
class SecuredStack:
    settings: Settings
    """The stack's settings: namespace ``inference``, the default models, no Kafka login."""

    @property
    def state_dir(self) -> Path:
        return Path(self.settings.stack.state_dir)

    @property
    def ca_location(self) -> Path:
        return KafkaSecrets(self.state_dir).authority().certificate

    def admin_kafka(self) -> KafkaSettings:
        return admin_kafka_settings(self.settings)

    def for_namespace(self, namespace: str, **overrides: Any) -> Settings:
        """Settings for ``namespace`` whose ACLs (for the same principals) are in place."""
        settings = self.settings.model_copy(update={"namespace": namespace, **overrides})
        apply_stack_acls(settings)
        return settings

    def principal_settings(
        self, principal: str, mechanism: Mechanism = "scram", base: Settings | None = None
    ) -> Settings:
        """``base`` (default: the stack's settings) logged in to Kafka as ``principal``."""
        source = base or self.settings
        environment = credential_environment(source, principal, mechanism)
        kafka = {
            name.removeprefix("SLUICEWAY_KAFKA__").lower(): value
            for name, value in environment.items()
        }
        return source.model_copy(update={"kafka": KafkaSettings(**kafka)})

    def librdkafka_config(self, principal: str, mechanism: Mechanism) -> dict[str, Any]:
        """A raw confluent-kafka configuration that authenticates as ``principal``."""
        stack = self.settings.stack
        if mechanism == "oauth":
            return {
                "bootstrap.servers": f"127.0.0.1:{stack.kafka_oauth_port}",
                "security.protocol": "SASL_SSL",
                "sasl.mechanism": "OAUTHBEARER",
                "ssl.ca.location": str(self.ca_location),
                "oauth_cb": self.token_callback(principal),
            }
        environment = credential_environment(self.settings, principal, mechanism)
        prefix = "SLUICEWAY_KAFKA__"
        config = {
            "bootstrap.servers": environment[f"{prefix}BOOTSTRAP_SERVERS"],
            "security.protocol": environment[f"{prefix}SECURITY_PROTOCOL"],
            "ssl.ca.location": environment[f"{prefix}SSL_CA_LOCATION"],
        }
        if mechanism == "scram":
            config["sasl.mechanism"] = environment[f"{prefix}SASL_MECHANISM"]
            config["sasl.username"] = environment[f"{prefix}SASL_USERNAME"]
            config["sasl.password"] = environment[f"{prefix}SASL_PASSWORD"]
        else:
            config["ssl.certificate.location"] = environment[f"{prefix}SSL_CERTIFICATE_LOCATION"]
            config["ssl.key.location"] = environment[f"{prefix}SSL_KEY_LOCATION"]
        return config

    def token_callback(
        self, principal: str, lifetime_s: float = 3600.0
    ) -> Callable[[str], tuple[str, float]]:
        """A confluent-kafka ``oauth_cb`` handing out tokens of the stack's issuer."""
        issuer = ensure_issuer(self.state_dir)

        def token(_config: str) -> tuple[str, float]:
            return issuer.token(principal, lifetime_s), time.time() + lifetime_s

        return token


@pytest.fixture(scope="session")
def secured_stack(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[SecuredStack]:
    base = int(os.environ.get(PORT_BASE_ENV, str(DEFAULT_PORT_BASE)))
    settings = secured_settings(tmp_path_factory.mktemp("secured-stack"), base)
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def progress(line: str) -> None:
        with capture.global_and_fixture_disabled():
            print(f"[secured stack] {line}", flush=True)

    try:
        manager.up(settings, progress)
        yield SecuredStack(settings)
    finally:
        manager.down(settings, progress)
