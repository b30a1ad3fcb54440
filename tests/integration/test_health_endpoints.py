"""/healthz and /readyz of a real worker: readiness turns false while the only backend of its
model (a Triton of this test's own) is down, and true again once it is back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.settings import LocalSettings, load_local_settings
from devkit.stack.services import TritonService
from pipeline.settings import Settings
from pipeline.topics import ModelTopics
from tests.integration import scrape, traffic
from tests.integration.local_ports import free_port
from tests.integration.test_worker import Workers, topics, workers  # noqa: F401 (fixtures)
from tests.integration.waiting import wait_until


class OwnTriton:
    """A Triton on free ports, with its own state folder: the shared one is never stopped."""

    def __init__(self, tmp_path: Path, model_repository: Path | None = None) -> None:
        stack = load_local_settings().stack.model_copy(
            update={
                "state_dir": tmp_path / "own-triton",
                "triton_http_port": free_port(),
                "triton_grpc_port": free_port(),
                "triton_metrics_port": free_port(),
            }
        )
        self.service = TritonService(LocalSettings(stack=stack))
        self.service.install(lambda _line: None)  # trains the demo model in deploy/, as always
        if model_repository is not None:
            self.service.stack = stack.model_copy(update={"model_repository": model_repository})
        self.grpc_url = f"127.0.0.1:{stack.triton_grpc_port}"
        self.http_url = f"127.0.0.1:{stack.triton_http_port}"
        self.metrics_port = stack.triton_metrics_port

    def start(self) -> None:
        launch = self.service.prepare()
        self.service.process.start(launch.argv, launch.env)
        wait_until(self.service.healthy, 90, "the test's own Triton to be ready")

    def stop(self) -> None:
        assert self.service.process.stop()


@pytest.fixture
def own_triton(tmp_path: Path) -> Iterator[OwnTriton]:
    triton = OwnTriton(tmp_path)
    triton.start()
    try:
        yield triton
    finally:
        triton.service.process.stop()


def test_readiness_is_false_while_the_models_only_backend_is_down_and_true_after(
    settings: Settings,
    topics: ModelTopics,  # noqa: F811 (the fixture imported above)
    own_triton: OwnTriton,
    workers: Workers,  # noqa: F811 (the fixture imported above)
) -> None:
    settings = settings.model_copy(
        update={
            "backends": settings.backends.model_copy(
                update={
                    "triton": settings.backends.triton.model_copy(
                        update={"grpc_url": own_triton.grpc_url, "http_url": own_triton.http_url}
                    )
                }
            )
        }
    )
    workers.settings = settings
    port = free_port()
    worker = workers.start(
        SLUICEWAY_WORKERS__METRICS_PORT=str(port),
        # Small batches: enough backend calls to fill the breaker's window with a few requests.
        SLUICEWAY_WORKERS__MAX_BATCH_SIZE="4",
    )

    def answer(path: str) -> tuple[int, str]:
        assert worker.poll() is None, workers.logs()
        return scrape.get(port, path)

    wait_until(lambda: scrape.answers(port, "/readyz"), 60, "the worker's health endpoint")
    wait_until(lambda: answer("/readyz") == (200, "ok\n"), 60, "ready: partitions assigned")
    before = [traffic.scaler_request(i) for i in range(40)]
    traffic.publish_requests(settings, topics.requests, before)
    traffic.collect(settings, topics.results, topics.dlq, len(before), timeout_s=60)

    own_triton.stop()
    during = [traffic.scaler_request(i) for i in range(200)]
    traffic.publish_requests(settings, topics.requests, during)
    wait_until(lambda: answer("/readyz")[0] == 503, 60, "not ready while Triton is down")
    assert answer("/readyz")[1] == "breaker open for every model: scaler\n"
    assert answer("/healthz") == (200, "ok\n"), "the loop still turns: live, only not ready"

    own_triton.start()
    wait_until(lambda: answer("/readyz") == (200, "ok\n"), 60, "ready again after Triton is back")
    got = traffic.collect(settings, topics.results, topics.dlq, 240, timeout_s=60)
    assert {str(r.request_id) for r in got.results} == {str(r.request_id) for r in before + during}
    assert got.dead_letters == []
    assert workers.stop(worker) == 0, workers.logs()
