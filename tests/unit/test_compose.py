"""The docker compose file cannot run here (no Docker engine): check it against the settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from devkit.settings import load_local_settings
from pipeline.settings import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return loaded


def _published(service: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """Map container port -> (setting variable, default host port)."""
    published = {}
    for mapping in service["ports"]:
        match = re.fullmatch(r"\$\{(SLUICEWAY_[A-Z_]+):-(\d+)\}:(\d+)", mapping)
        assert match, f"port mapping {mapping!r} is not ${{SETTING:-default}}:port"
        published[int(match[3])] = (match[1], int(match[2]))
    return published


def test_ports_use_the_settings_names_and_defaults() -> None:
    stack = load_local_settings().stack
    services = _compose()["services"]
    expected = {
        "kafka": {9092: ("SLUICEWAY_STACK__KAFKA_PORT", stack.kafka_port)},
        "minio": {
            9000: ("SLUICEWAY_STACK__MINIO_PORT", stack.minio_port),
            9001: ("SLUICEWAY_STACK__MINIO_CONSOLE_PORT", stack.minio_console_port),
        },
        "triton": {
            8000: ("SLUICEWAY_STACK__TRITON_HTTP_PORT", stack.triton_http_port),
            8001: ("SLUICEWAY_STACK__TRITON_GRPC_PORT", stack.triton_grpc_port),
            8002: ("SLUICEWAY_STACK__TRITON_METRICS_PORT", stack.triton_metrics_port),
        },
    }
    assert {name: _published(services[name]) for name in expected} == expected


def test_every_setting_name_in_the_file_exists() -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    settings = load_local_settings().as_dict()
    for variable in set(re.findall(r"\$\{(SLUICEWAY_[A-Z_]+)", text)):
        node: Any = settings
        for part in variable.removeprefix("SLUICEWAY_").lower().split("__"):
            assert isinstance(node, dict), f"{variable} goes below a leaf setting"
            assert part in node, f"{variable} is not a setting"
            node = node[part]


def test_minio_credentials_come_from_the_object_store_settings() -> None:
    store = load_settings().object_store
    environment = _compose()["services"]["minio"]["environment"]
    assert environment["MINIO_ROOT_USER"] == (
        f"${{SLUICEWAY_OBJECT_STORE__ACCESS_KEY:-{store.access_key}}}"
    )
    assert environment["MINIO_ROOT_PASSWORD"] == (
        f"${{SLUICEWAY_OBJECT_STORE__SECRET_KEY:-{store.secret_key.get_secret_value()}}}"
    )


def test_triton_mounts_the_same_model_repository_as_the_native_stack() -> None:
    triton = _compose()["services"]["triton"]
    host_path, container_path, _mode = triton["volumes"][0].split(":")
    assert (DEPLOY / host_path).resolve() == (
        Path(__file__).resolve().parents[2] / load_local_settings().stack.model_repository
    ).resolve()
    assert f"--model-repository={container_path}" in triton["command"]
    assert (DEPLOY / host_path / "scaler" / "config.pbtxt").is_file()
