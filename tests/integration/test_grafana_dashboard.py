"""Every metric the Grafana dashboard (deploy/grafana/sluiceway.json) queries is exposed by the
real worker and monitor, scraped while they serve and judge real traffic."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.demo.feeds import LabelledFeed
from devkit.modeling.training import DEMO_MODEL
from pipeline.settings import Settings
from tests.integration import scrape
from tests.integration.local_ports import free_port
from tests.integration.test_monitor import Scene, scene  # noqa: F401 (a fixture)
from tests.integration.waiting import wait_until

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "sluiceway.json"
_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
_KEYWORDS |= {"unless", "offset", "atan2", "inf", "nan"}
# Label lists after by/without/on/ignoring/group_left/group_right name labels, not metrics.
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,[^)]*\)")


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"]
        for panel in board["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            queries.append(query["query"])
    return queries


def metric_names(query: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana's ``label_values()``) selects: every
    identifier that is no function (followed by ``(``), keyword, label or Grafana variable."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)  # strings: regexes, label values
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # ranges such as [$__rate_interval]
    text = _LABEL_LIST.sub(" ", text)
    names = set(_LABEL_VALUES.findall(text))
    text = _LABEL_VALUES.sub(" ", text)
    for match in _IDENTIFIER.finditer(text):
        following = text[match.end() :].lstrip()
        name = match.group()
        preceded_by_variable = text[: match.start()].endswith("$")
        if not following.startswith("(") and name not in _KEYWORDS and not preceded_by_variable:
            names.add(name)
    return names


def test_the_query_parser_sees_every_metric_name() -> None:
    assert metric_names(
        'sum by (m) (label_replace(x_lag, "model", "$1", "topic", "a{b}")) / rate(y_total[5m])'
    ) == {"x_lag", "y_total"}
    assert metric_names("max by (breaker) (b_state) > bool 1 and on(model) up") == {"b_state", "up"}
    assert metric_names("label_values(z_total, model)") == {"z_total"}
    assert metric_names(
        'histogram_quantile(0.5, sum by (le) (rate(h_bucket{m=~"$model"}[1m])))'
    ) == {"h_bucket"}


@pytest.fixture
def monitored(settings: Settings) -> Settings:
    """test_monitor's scene (a worker and a monitor of the demo model) with metrics ports, and
    windows short and small enough that one is judged within seconds."""
    return settings.model_copy(
        update={
            "workers": settings.workers.model_copy(update={"metrics_port": free_port()}),
            "monitor": settings.monitor.model_copy(
                update={"metrics_port": free_port(), "window_s": 2.0, "min_window_count": 50}
            ),
        }
    )


@pytest.fixture
def running(scene: Scene) -> Iterator[tuple[int, int]]:  # noqa: F811 (the fixture imported above)
    """The worker's and the monitor's metrics ports, once both answer, with labelled traffic."""
    ports = (scene.settings.workers.metrics_port, scene.settings.monitor.metrics_port)
    assert ports[0] is not None
    assert ports[1] is not None
    for process, port in zip((scene.worker, scene.monitor), ports, strict=True):
        wait_until(
            lambda process=process, port=port: (
                process.process is not None
                and (process.process.poll() is not None or scrape.answers(port, "/readyz"))
            ),
            60,
            f"{process.args[0]}'s endpoint",
        )
        assert process.process is not None
        assert process.process.poll() is None, f"{process.args[0]} exited"
    feed = LabelledFeed(scene.settings, DEMO_MODEL, 100.0).start()
    try:
        yield ports[0], ports[1]
    finally:
        feed.stop()


def test_every_metric_the_dashboard_queries_is_exposed_by_the_worker_and_monitor(
    running: tuple[int, int],
) -> None:
    worker_port, monitor_port = running

    # The core panels must show real samples, not only families: the worker served, batched,
    # called Triton and reported lag; the monitor counted results and judged a window.
    worker_samples = {
        "sluiceway_results_total",
        "sluiceway_batch_size_bucket",
        "sluiceway_backend_latency_seconds_bucket",
        "sluiceway_consumer_lag",
        "sluiceway_breaker_state",
    }
    monitor_samples = {
        "sluiceway_monitor_results_total",
        "sluiceway_drift_reports_total",
        "sluiceway_drift_metric",
    }

    def sampled() -> bool:
        return worker_samples <= scrape.exposed_names(worker_port)[1] and (
            monitor_samples <= scrape.exposed_names(monitor_port)[1]
        )

    wait_until(sampled, 90, "samples of the core metrics (a judged window among them)")
    worker_possible, _ = scrape.exposed_names(worker_port)
    monitor_possible, _ = scrape.exposed_names(monitor_port)
    used = set().union(*(metric_names(q) for q in dashboard_queries()))
    assert len(used) >= 20
    missing = used - worker_possible - monitor_possible
    assert missing == set(), f"the dashboard queries metrics no process exposes: {missing}"
    assert worker_samples | monitor_samples <= used
    # Both answer their probes on the real stack: live, and ready (assigned / caught up).
    for port in (worker_port, monitor_port):
        assert scrape.get(port, "/healthz") == (200, "ok\n")
        wait_until(lambda port=port: scrape.get(port, "/readyz")[0] == 200, 30, "ready")
