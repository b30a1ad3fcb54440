"""Liveness and readiness: the pure state (fake clock), its HTTP answers, and the worker's hooks."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, make_wsgi_app

from pipeline.health import HealthState
from pipeline.metrics import health_app
from pipeline.resilience.breaker import BreakerConfig
from tests.unit.fakes import FakeClock
from tests.unit.test_worker_policies import Scene, request, settings, stopped, until


def test_a_process_is_live_while_its_loop_turns_and_not_once_it_stalls() -> None:
    clock = FakeClock()
    health = HealthState(clock=clock, stall_after_s=10)
    clock.advance(9)
    assert health.liveness().ok, "starting: one stall interval from creation"
    clock.advance(2)
    verdict = health.liveness()
    assert not verdict.ok
    assert verdict.reasons == ("loop has not turned for 11.0s",)
    health.loop_turned()
    clock.advance(10)
    assert health.liveness().ok


def test_ready_needs_partitions_and_a_model_whose_breaker_is_not_open() -> None:
    health = HealthState(["a", "b"], clock=FakeClock())
    assert health.readiness().reasons == ("no partitions assigned",)
    health.assignment("a", 3)
    health.assignment("b", 0)
    assert health.readiness().ok
    health.breaker_changed("triton:8001/a", "a", is_open=True)
    assert health.readiness().ok, "model b can still be served"
    health.breaker_changed("vllm/b", "b", is_open=True)
    assert health.readiness().reasons == ("breaker open for every model: a, b",)
    health.breaker_changed("triton:8001/a", "a", is_open=False)
    assert health.readiness().ok
    health.assignment("a", 0)
    assert health.readiness().reasons == ("no partitions assigned",)


def test_a_stopping_process_is_not_ready() -> None:
    health = HealthState(["a"], clock=FakeClock())
    health.assignment("a", 1)
    health.stopping()
    assert health.readiness().reasons == ("stopping",)


@pytest.mark.parametrize("bad", [{"stall_after_s": 0}, {"stall_after_s": -1}])
def test_odd_configuration_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="stall_after_s must be positive"):
        HealthState(**bad)


def test_a_negative_partition_count_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        HealthState().assignment("a", -1)


def _get(app: Any, path: str) -> tuple[str, str]:
    answered: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        answered.append(status)

    environ = {
        "PATH_INFO": path,
        "REQUEST_METHOD": "GET",
        "QUERY_STRING": "",
        "wsgi.input": io.BytesIO(),
    }
    body: Iterable[bytes] = app(environ, start_response)
    return answered[0], b"".join(body).decode()


def test_health_paths_answer_200_or_503_and_metrics_stay_beside_them() -> None:
    registry = CollectorRegistry()
    Counter("probe_things", "things", registry=registry).inc()
    clock = FakeClock()
    health = HealthState(["a"], clock=clock, stall_after_s=5)
    app = health_app(make_wsgi_app(registry), health)
    assert _get(app, "/readyz") == ("503 Service Unavailable", "no partitions assigned\n")
    health.assignment("a", 2)
    assert _get(app, "/readyz") == ("200 OK", "ok\n")
    assert _get(app, "/healthz") == ("200 OK", "ok\n")
    clock.advance(6)
    assert _get(app, "/healthz")[0] == "503 Service Unavailable"
    status, text = _get(app, "/metrics")
    assert status.startswith("200")
    assert "probe_things_total 1.0" in text
    assert _get(health_app(make_wsgi_app(registry), None), "/readyz")[0] == "404 Not Found"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/readyz", "405"),
        ("DELETE", "/healthz", "405"),
        ("HEAD", "/readyz", "503"),
        ("GET", "/readyz/", "200"),
        ("GET", "/" + "r" * 100_000, "200"),
        ("GET", "/\u00e9\u0000", "200"),
        ("GET", "", "200"),
    ],
)
def test_odd_requests_get_an_answer_and_change_nothing(method: str, path: str, status: str) -> None:
    """Whoever reaches the port: every request is answered, and health cannot be set from it."""
    registry = CollectorRegistry()
    Counter("probe_things", "things", registry=registry)
    health = HealthState(["a"], clock=FakeClock())
    app = health_app(make_wsgi_app(registry), health)
    answered: list[str] = []
    environ = {
        "PATH_INFO": path,
        "REQUEST_METHOD": method,
        "QUERY_STRING": "",
        "wsgi.input": io.BytesIO(b"x" * 1024),
    }
    body = b"".join(app(environ, lambda status, headers: answered.append(status)))
    # Paths other than the two health paths are the metrics exposition's (it serves any path).
    assert answered[0][:3] == status
    assert body
    assert health.readiness().reasons == ("no partitions assigned",)


def test_the_worker_reports_assignment_open_breakers_and_stopping() -> None:
    """Not ready before its group member is assigned, ready while serving, not ready while
    the only model's breaker is open, ready again after the outage, not ready once stopped."""
    scene = Scene(settings())
    scene.backend.transient = True
    breaker = BreakerConfig(window_size=4, minimum_calls=2, open_wait_s=1.0, probe_calls=1)

    async def scenario() -> None:
        worker = scene.worker(breaker_config=breaker)
        assert worker.health.readiness().reasons == ("no partitions assigned",)
        task = asyncio.create_task(worker.run())
        scene.publish(*(request(float(i)) for i in range(10)))
        await until(
            lambda: (
                not worker.health.readiness().ok
                and "breaker open" in " ".join(worker.health.readiness().reasons)
            ),
            "not ready: the breaker of the only model is open",
        )
        assert worker.health.liveness().ok
        scene.backend.transient = False
        await until(lambda: len(scene.results()) == 10, "every request served after the outage")
        await until(lambda: worker.health.readiness().ok, "ready again")
        await stopped(worker, task)
        assert worker.health.readiness().reasons[0] == "stopping"

    asyncio.run(asyncio.wait_for(scenario(), 60))
