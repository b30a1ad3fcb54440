"""Real services for integration tests, found in this order:

1. endpoints named by ``SLUICEWAY_TEST_*`` environment variables (a stack you run yourself),
2. testcontainers, when a Docker engine answers,
3. the native local stack (``sluiceway stack up``): what runs on machines without Docker.

Nothing here mocks Kafka, MinIO or Triton.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.kafka.admin import TopicSpec, ensure_topics
from pipeline.settings import Settings
from tests.integration.endpoints import Endpoints, endpoints_from_env, native_stack
from tests.integration.secured_stack import secured_stack  # noqa: F401 (a session fixture)

INTEGRATION_DIR = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).is_relative_to(INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)


def _docker_answers() -> bool:
    """Whether a Docker engine answers (the client alone, as on these machines, is not enough)."""
    try:
        probe = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=15,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0 and bool(probe.stdout.strip())


@pytest.fixture(scope="session")
def endpoints(pytestconfig: pytest.Config) -> Iterator[Endpoints]:
    from_env = endpoints_from_env(os.environ)
    if from_env is not None:
        yield from_env
    elif _docker_answers():
        from tests.integration.containers import container_stack

        with container_stack() as found:
            yield found
    else:
        # A first run builds MinIO for minutes: show its progress past pytest's capture.
        capture = pytestconfig.pluginmanager.getplugin("capturemanager")

        def progress(line: str) -> None:
            with capture.global_and_fixture_disabled():
                print(f"[stack] {line}", flush=True)

        with native_stack(progress) as found:
            yield found


@pytest.fixture
def settings(endpoints: Endpoints) -> Settings:
    """Settings pointing at the test services, with a namespace of this test's own.

    Workers run as one process (not one per core): a test that wants a supervisor of several
    says so (``test_worker_processes.py``), and the others measure and signal one worker.
    """
    return endpoints.settings(namespace=f"test-{uuid.uuid4().hex[:8]}", workers={"processes": 1})


@pytest.fixture
def new_topic(settings: Settings) -> Callable[..., str]:
    """Create a fresh topic with a unique name and return its name."""

    def create(partitions: int = 3, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        ensure_topics(settings.kafka, [TopicSpec(name, partitions=partitions)])
        return name

    return create
