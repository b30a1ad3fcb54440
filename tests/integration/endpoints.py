"""Where the integration tests find Kafka, MinIO and Triton."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from devkit.settings import load_demo_settings, load_local_settings
from devkit.stack import manager
from pipeline.settings import Settings

ENV_NAMES = {
    "kafka_bootstrap": "SLUICEWAY_TEST_KAFKA_BOOTSTRAP",
    "s3_endpoint": "SLUICEWAY_TEST_S3_ENDPOINT",
    "s3_access_key": "SLUICEWAY_TEST_S3_ACCESS_KEY",
    "s3_secret_key": "SLUICEWAY_TEST_S3_SECRET_KEY",
    "triton_http": "SLUICEWAY_TEST_TRITON_HTTP",
    "triton_grpc": "SLUICEWAY_TEST_TRITON_GRPC",
    "triton_metrics": "SLUICEWAY_TEST_TRITON_METRICS",
}


@dataclass(frozen=True)
class Endpoints:
    kafka_bootstrap: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    triton_http: str
    triton_grpc: str
    triton_metrics: str
    """host:port of Triton's Prometheus endpoint (where models' custom counters show)."""
    source: str

    def settings(self, **overrides: Any) -> Settings:
        # The runtime's settings with the demo's models: what the workers under test read.
        return load_demo_settings(
            kafka={"bootstrap_servers": self.kafka_bootstrap},
            object_store={
                "endpoint": self.s3_endpoint,
                "access_key": self.s3_access_key,
                "secret_key": self.s3_secret_key,
            },
            backends={"triton": {"http_url": self.triton_http, "grpc_url": self.triton_grpc}},
            **overrides,
        )


def endpoints_from_env(environ: Mapping[str, str]) -> Endpoints | None:
    """Return endpoints when every ``SLUICEWAY_TEST_*`` variable is set, else ``None``."""
    values = {field: environ.get(name) for field, name in ENV_NAMES.items()}
    if not all(values.values()):
        return None
    return Endpoints(**{k: str(v) for k, v in values.items()}, source="environment")


@contextlib.contextmanager
def native_stack(progress: Callable[[str], None] = print) -> Iterator[Endpoints]:
    """Bring the native stack up; stop it afterwards only if this session started it."""
    settings = load_local_settings()
    rows = manager.up(settings, progress)
    started_here = not any(row.reused for row in rows)
    stack = settings.stack
    try:
        yield Endpoints(
            kafka_bootstrap=f"127.0.0.1:{stack.kafka_port}",
            s3_endpoint=f"127.0.0.1:{stack.minio_port}",
            s3_access_key=settings.object_store.access_key,
            s3_secret_key=settings.object_store.secret_key.get_secret_value(),
            triton_http=f"127.0.0.1:{stack.triton_http_port}",
            triton_grpc=f"127.0.0.1:{stack.triton_grpc_port}",
            triton_metrics=f"127.0.0.1:{stack.triton_metrics_port}",
            source="native stack",
        )
    finally:
        if started_here and not os.environ.get("SLUICEWAY_TEST_KEEP_STACK"):
            manager.down(settings, progress)
