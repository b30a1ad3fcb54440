"""`sluiceway stack`: status, idempotent up, a clear error for a taken port, clean down."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from devkit.settings import load_local_settings
from devkit.stack import manager
from sluiceway import main
from tests.integration.endpoints import Endpoints


def _processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_status_shows_every_service_with_version_and_endpoint(
    endpoints: Endpoints, capsys: pytest.CaptureFixture[str]
) -> None:
    if endpoints.source != "native stack":
        pytest.fail(f"this test checks the native stack, but the tests use {endpoints.source}")
    assert main(["stack", "status"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["SERVICE", "STATE", "PID", "VERSION", "ENDPOINT"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert set(rows) == {"kafka", "minio", "triton"}
    assert "healthy" in rows["kafka"]
    assert "Apache Kafka 4.1.1" in rows["kafka"]
    assert endpoints.kafka_bootstrap in rows["kafka"]
    assert "MinIO v0.0.0-" in rows["minio"]
    assert endpoints.s3_endpoint in rows["minio"]
    assert "Triton 2.51.0" in rows["triton"]
    assert endpoints.triton_http in rows["triton"]


def test_up_reuses_a_healthy_running_stack(endpoints: Endpoints) -> None:
    before = {row.name: row.pid for row in manager.status(load_local_settings())}
    rows = manager.up(load_local_settings(), progress=lambda _line: None)
    assert all(row.reused and row.state == "healthy" for row in rows)
    assert {row.name: row.pid for row in rows} == before


def test_taken_port_gives_one_clear_line_and_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        monkeypatch.setenv("SLUICEWAY_STACK__STATE_DIR", str(tmp_path / "state"))
        monkeypatch.setenv("SLUICEWAY_STACK__KAFKA_PORT", str(port))
        monkeypatch.setenv("SLUICEWAY_STACK__KAFKA_CONTROLLER_PORT", str(_free_port()))
        assert main(["stack", "up"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        f"sluiceway: error: kafka: port {port} is already in use by another process; "
        "stop that process or choose another port with SLUICEWAY_STACK__KAFKA_PORT"
    ]
    assert _processes_mentioning(str(tmp_path / "state")) == []


def test_second_stack_on_other_ports_starts_and_down_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("SLUICEWAY_STACK__STATE_DIR", str(state))
    for setting in (
        "KAFKA_PORT",
        "KAFKA_CONTROLLER_PORT",
        "MINIO_PORT",
        "MINIO_CONSOLE_PORT",
        "TRITON_HTTP_PORT",
        "TRITON_GRPC_PORT",
        "TRITON_METRICS_PORT",
    ):
        monkeypatch.setenv(f"SLUICEWAY_STACK__{setting}", str(_free_port()))
    try:
        assert main(["stack", "up"]) == 0
        assert "stack is up" in capsys.readouterr().out
        assert len(_processes_mentioning(str(state))) >= 3
        assert main(["stack", "status"]) == 0
    finally:
        assert main(["stack", "down"]) == 0
    assert "stopped: triton, minio, kafka" in capsys.readouterr().out
    assert _processes_mentioning(str(state)) == []
    assert main(["stack", "status"]) == 1
    assert "stopped" in capsys.readouterr().out
