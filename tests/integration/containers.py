"""The testcontainers path: the official images from deploy/docker-compose.yml.

Used only where a Docker engine answers; the machines this project is built on have none, so
there the native stack serves the same tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tests.integration.endpoints import Endpoints

MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "deploy" / "triton" / "models"


@contextlib.contextmanager
def container_stack() -> Iterator[Endpoints]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs
    from testcontainers.kafka import KafkaContainer
    from testcontainers.minio import MinioContainer

    kafka = KafkaContainer("apache/kafka:4.1.1").with_kraft()
    minio = MinioContainer("minio/minio:latest")
    triton = (
        DockerContainer("nvcr.io/nvidia/tritonserver:24.10-py3")
        .with_command("tritonserver --model-repository=/models --strict-readiness=true")
        .with_volume_mapping(str(MODEL_REPOSITORY), "/models", "ro")
        .with_exposed_ports(8000, 8001, 8002)
    )
    with kafka, minio, triton:
        wait_for_logs(triton, "Started HTTPService", timeout=180)
        minio_config = minio.get_config()
        yield Endpoints(
            kafka_bootstrap=kafka.get_bootstrap_server(),
            s3_endpoint=minio_config["endpoint"],
            s3_access_key=minio_config["access_key"],
            s3_secret_key=minio_config["secret_key"],
            triton_http=f"{triton.get_container_host_ip()}:{triton.get_exposed_port(8000)}",
            triton_grpc=f"{triton.get_container_host_ip()}:{triton.get_exposed_port(8001)}",
            triton_metrics=f"{triton.get_container_host_ip()}:{triton.get_exposed_port(8002)}",
            source="testcontainers",
        )
