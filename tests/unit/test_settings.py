from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from devkit.settings import load_local_settings
from pipeline.settings import SettingsError, load_settings
from sluiceway import main


def test_runtime_defaults_point_at_the_local_stack_and_serve_no_model() -> None:
    settings = load_settings()
    local = load_local_settings()
    assert settings.namespace == "inference"
    assert settings.models == {}
    assert "stack" not in settings.as_dict()
    assert settings.kafka.bootstrap_servers == f"127.0.0.1:{local.stack.kafka_port}"
    assert settings.object_store.endpoint == f"127.0.0.1:{local.stack.minio_port}"
    assert settings.backends.triton.grpc_url == f"127.0.0.1:{local.stack.triton_grpc_port}"


def test_local_settings_put_the_demo_models_below_the_configuration_file(tmp_path: Path) -> None:
    config = tmp_path / "s.yaml"
    config.write_text(
        "models:\n  invoice_risk:\n    default_version: '2'\n  mine:\n    backend: vllm\n"
    )
    local = load_local_settings(config)
    assert set(local.models) == {"scaler", "invoice_risk", "case_summary", "mine"}
    assert local.models["invoice_risk"].default_version == "2"
    assert local.models["invoice_risk"].explains  # the rest of the entry is the demo file's
    # A runtime child rebuilt from them has the models and no stack section.
    environment = local.as_environment()
    assert "SLUICEWAY_STACK" not in environment
    assert set(json.loads(environment["SLUICEWAY_MODELS"])) == set(local.models)
    assert set(load_settings(config).models) == {"invoice_risk", "mine"}


def test_a_stack_section_is_refused_by_the_runtime_with_its_name(tmp_path: Path) -> None:
    config = tmp_path / "s.yaml"
    config.write_text("stack:\n  kafka_port: 1\n")
    with pytest.raises(SettingsError, match=r"setting stack from .*s\.yaml"):
        load_settings(config)


def test_environment_overrides_yaml_and_explicit_values_override_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "sluiceway.yaml"
    config.write_text("kafka:\n  bootstrap_servers: yaml:9092\n  client_id: from-yaml\n")
    monkeypatch.setenv("SLUICEWAY_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    settings = load_settings(config)
    assert settings.kafka.bootstrap_servers == "env:9092"
    assert settings.kafka.client_id == "from-yaml"
    assert load_settings(config, kafka={"client_id": "flag"}).kafka.client_id == "flag"


def test_config_file_named_by_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "s.yaml"
    config.write_text("namespace: acme\nworkers:\n  max_batch_size: 128\n")
    monkeypatch.setenv("SLUICEWAY_CONFIG", str(config))
    settings = load_settings()
    assert (settings.namespace, settings.workers.max_batch_size) == ("acme", 128)


def test_secrets_are_masked_unless_revealed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEWAY_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("SLUICEWAY_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("SLUICEWAY_KAFKA__SASL_USERNAME", "sluiceway")
    monkeypatch.setenv("SLUICEWAY_KAFKA__SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("SLUICEWAY_OBJECT_STORE__SECRET_KEY", "s3-secret")
    settings = load_settings()
    shown = json.dumps(settings.as_dict())
    assert "hunter2" not in shown
    assert "s3-secret" not in shown
    assert "hunter2" not in repr(settings)
    assert "s3-secret" not in str(settings)
    revealed = settings.as_dict(reveal_secrets=True)
    assert revealed["kafka"]["sasl_password"] == "hunter2"
    assert revealed["object_store"]["secret_key"] == "s3-secret"
    assert settings.kafka.client_config()["sasl.password"] == "hunter2"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("workers:\n  max_batch_size: nine\n", "setting workers.max_batch_size from"),
        ("workers:\n  metrics_port: 70000\n", "setting workers.metrics_port from"),
        ("kafka:\n  security_protocol: TLS\n", "setting kafka.security_protocol from"),
        ("stak:\n  kafka_port: 1\n", "setting stak from"),
        ("stack: [1,\n  2", "invalid YAML"),
        ("- just\n- a list\n", "the top level must be a mapping"),
    ],
)
def test_broken_settings_file_names_the_problem(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    with pytest.raises(SettingsError) as caught:
        load_settings(config)
    assert expected in str(caught.value)
    assert str(config) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_cli_reports_a_broken_settings_file_in_one_line_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("stack:\n  minio_port: lots\n")
    assert main(["--config", str(config), "stack", "status"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    # The local stack's settings name the demo's file below the configuration file.
    assert captured.err.startswith("sluiceway: error: setting stack.minio_port from ")
    assert str(config) in captured.err
    assert captured.err.count("\n") == 1
    assert "Traceback" not in captured.err


def test_cli_prints_settings_with_secrets_masked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SLUICEWAY_OBJECT_STORE__SECRET_KEY", "do-not-print")
    assert main(["settings"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed)["object_store"]["secret_key"] == "**********"
    assert "do-not-print" not in printed


def test_as_environment_rebuilds_the_same_settings_in_a_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings(
        namespace="child-1",
        backends={"vllm": {"base_url": "http://vllm:8000/v1", "api_key": "s3cret"}},
        models={"m": {"backend": "vllm", "served_names": {"2": "m-lora"}}},
    )
    for name in list(os.environ):
        if name.startswith("SLUICEWAY_"):
            monkeypatch.delenv(name)
    for name, value in settings.as_environment().items():
        monkeypatch.setenv(name, value)
    rebuilt = load_settings()
    assert rebuilt == settings
    assert rebuilt.backends.vllm.api_key is not None
    assert rebuilt.backends.vllm.api_key.get_secret_value() == "s3cret"


@pytest.mark.parametrize("command", ["worker", "monitor"])
def test_a_service_for_a_model_the_settings_lack_ends_in_one_line(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Runtime settings name no models by default: the demo's are not served by accident.
    assert main([command, "--model", "invoice_risk", "--model", "../etc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sluiceway: error: model '../etc', 'invoice_risk' is not in the settings")
    assert "(models: none)" in err
    assert err.count("\n") == 1
