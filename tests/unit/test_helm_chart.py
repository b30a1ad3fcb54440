"""The Helm chart, rendered by the real ``helm`` (built once into ~/.cache/sluiceway): it lints,
every manifest is valid for Kubernetes (``kubernetes-validate``'s schemas) and for KEDA (its CRD
schemas in deploy/keda/), and its names and ports are the ones ``sluiceway worker`` uses."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from devkit.settings import LocalSettings, load_demo_settings
from devkit.stack.installers import HELM_VERSION, install_helm
from pipeline.settings import Settings, load_settings
from pipeline.topics import ModelTopics
from tests.unit.fakes import FakeClock
from workers.inference.worker import InferenceWorker, worker_group_id

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "sluiceway"
SECURED_VALUES = CHART / "ci" / "two-models-secured-values.yaml"
KEDA_SCHEMAS = {
    "ScaledObject": ROOT / "deploy" / "keda" / "keda.sh_scaledobjects.v2.20.1.schema.yaml",
    "TriggerAuthentication": (
        ROOT / "deploy" / "keda" / "keda.sh_triggerauthentications.v2.20.1.schema.yaml"
    ),
}
KUBERNETES_VERSION = "1.33.0"
POD_NAME = "sluiceway-worker-invoice-risk-3"


@pytest.fixture(scope="module")
def helm() -> Path:
    return install_helm(LocalSettings().stack.cache_dir, HELM_VERSION, lambda _line: None)


def run_helm(helm: Path, command: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """``helm COMMAND ... --kube-version``: no cluster answers here, so the version is given."""
    return subprocess.run(
        [str(helm), command, *arguments, "--kube-version", KUBERNETES_VERSION],
        capture_output=True,
        text=True,
        check=False,
    )


def render(helm: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return run_helm(helm, "template", "sluiceway", str(CHART), *arguments)


def manifests(helm: Path, *arguments: str) -> list[dict[str, Any]]:
    rendered = render(helm, *arguments)
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


@pytest.fixture(scope="module")
def secured(helm: Path) -> list[dict[str, Any]]:
    return manifests(helm, "-f", str(SECURED_VALUES))


def of_kind(docs: list[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
    return (doc for doc in docs if doc["kind"] == kind)


def test_the_chart_lints_with_default_and_secured_values(helm: Path) -> None:
    for extra in ([], ["-f", str(SECURED_VALUES)]):
        linted = run_helm(helm, "lint", "--strict", str(CHART), *extra)
        assert linted.returncode == 0, linted.stdout + linted.stderr
        assert "0 chart(s) failed" in linted.stdout


def test_every_rendered_manifest_is_valid_for_kubernetes_and_keda(
    helm: Path, secured: list[dict[str, Any]]
) -> None:
    kinds: list[str] = []
    for docs in (secured, manifests(helm)):
        for doc in docs:
            kinds.append(doc["kind"])
            schema_file = KEDA_SCHEMAS.get(doc["kind"])
            if schema_file is None:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            else:
                assert doc["apiVersion"] == "keda.sh/v1alpha1"
                schema = yaml.safe_load(schema_file.read_text())
                jsonschema.validate(doc, schema)
    # Two models secured (2 workers, SASL): each piece is there, and was checked.
    assert sorted(set(kinds)) == [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "ScaledObject",
        "Secret",
        "Service",
        "StatefulSet",
        "TriggerAuthentication",
    ]
    assert kinds.count("ScaledObject") == 2 + 1


def test_a_kubernetes_schema_violation_is_caught(secured: list[dict[str, Any]]) -> None:
    """The validation above can fail: a misspelt field is refused."""
    (statefulset, *_) = of_kind(secured, "StatefulSet")
    broken = yaml.safe_load(yaml.safe_dump(statefulset))
    broken["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    (scaled, *_) = of_kind(secured, "ScaledObject")
    scaled = yaml.safe_load(yaml.safe_dump(scaled))
    del scaled["spec"]["scaleTargetRef"]["name"]
    with pytest.raises(jsonschema.ValidationError, match="'name' is a required property"):
        jsonschema.validate(scaled, yaml.safe_load(KEDA_SCHEMAS["ScaledObject"].read_text()))


def chart_settings(docs: list[dict[str, Any]], tmp_path: Path) -> Settings:
    """The settings a pod of the chart loads: its ConfigMap's file plus its Secrets' env."""
    (config_map,) = of_kind(docs, "ConfigMap")
    path = tmp_path / "settings.yaml"
    path.write_text(config_map["data"]["settings.yaml"])
    # The CA file exists only in the pod (a Secret's volume): here a stand-in takes its place.
    ca = tmp_path / "ca.crt"
    ca.write_text("stand-in")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SLUICEWAY_KAFKA__SSL_CA_LOCATION", str(ca))
        env.setenv("SLUICEWAY_OBJECT_STORE__SECRET_KEY", "from-a-kubernetes-secret")
        env.setenv("SLUICEWAY_KAFKA__SASL_PASSWORD", "from-a-kubernetes-secret")
        env.setenv("SLUICEWAY_WORKERS__GROUP_INSTANCE_ID", POD_NAME)
        return load_settings(path)


def test_groups_topics_and_ports_are_the_ones_the_worker_uses(
    secured: list[dict[str, Any]], tmp_path: Path
) -> None:
    settings = chart_settings(secured, tmp_path)
    (config_map,) = of_kind(secured, "ConfigMap")
    ca_location = yaml.safe_load(config_map["data"]["settings.yaml"])["kafka"]["ssl_ca_location"]
    assert settings.namespace == "acme"
    assert settings.kafka.sasl_password is not None
    port = settings.workers.metrics_port
    assert port == settings.monitor.metrics_port == 9464
    statefulsets = {doc["metadata"]["name"]: doc for doc in of_kind(secured, "StatefulSet")}
    scaled = list(of_kind(secured, "ScaledObject"))
    assert sorted(settings.models) == ["case_summary", "invoice_risk"]
    assert len(scaled) == len(settings.models)
    for scaled_object in scaled:
        target = statefulsets[scaled_object["spec"]["scaleTargetRef"]["name"]]
        (container,) = target["spec"]["template"]["spec"]["containers"]
        model = container["args"][container["args"].index("--model") + 1]
        (trigger,) = scaled_object["spec"]["triggers"]
        worker = InferenceWorker(
            settings,
            [model],
            {"triton": object(), "vllm": object()},  # type: ignore[dict-item]
            object(),  # type: ignore[arg-type]
            clock=FakeClock(),
        )
        group = worker_group_id(settings.namespace, model)
        built = worker._consumer_config(group)
        assert trigger["metadata"]["consumerGroup"] == built["group.id"] == group
        assert trigger["metadata"]["topic"] == ModelTopics(settings.namespace, model).requests
        assert trigger["metadata"]["bootstrapServers"] == built["bootstrap.servers"]
        # Static membership from the pod's own name (with librdkafka's session timeout, so a
        # restarted pod returns in time), and each topic's partitions spread over the members.
        assert built["group.instance.id"] == POD_NAME
        assert "session.timeout.ms" not in built
        assert built["partition.assignment.strategy"] == "range"
        assert container["args"][-2:] == ["--processes", "1"]
        instance_env = {e["name"]: e for e in container["env"]}
        assert instance_env["SLUICEWAY_WORKERS__GROUP_INSTANCE_ID"]["value"] == "$(POD_NAME)"
        assert instance_env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        # The settings' CA path is the CA Secret's key in the volume mounted there.
        pod_spec = target["spec"]["template"]["spec"]
        (ca_mount,) = [
            m for m in container["volumeMounts"] if ca_location.startswith(m["mountPath"])
        ]
        (ca_volume,) = [v for v in pod_spec["volumes"] if v["name"] == ca_mount["name"]]
        assert ca_volume["secret"]["secretName"] == "sluiceway-kafka-ca"
        assert ca_location == f"{ca_mount['mountPath']}/ca.crt"
        (container_port,) = container["ports"]
        assert container_port["containerPort"] == port
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            assert container[probe]["httpGet"] == {"path": path, "port": container_port["name"]}
        pod = target["spec"]["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        # Graceful drain fits in the grace period.
        assert pod["spec"]["terminationGracePeriodSeconds"] > settings.workers.drain_timeout_s
    services = {doc["metadata"]["name"]: doc for doc in of_kind(secured, "Service")}
    assert {p["port"] for s in services.values() for p in s["spec"]["ports"]} == {port}


def test_scaling_is_capped_by_partitions_and_never_stuck_at_zero(
    secured: list[dict[str, Any]],
) -> None:
    values = yaml.safe_load(SECURED_VALUES.read_text())
    by_target = {
        doc["spec"]["scaleTargetRef"]["name"]: doc["spec"]
        for doc in of_kind(secured, "ScaledObject")
    }
    for model, spec in values["models"].items():
        scaled = by_target[f"sluiceway-worker-{model.replace('_', '-')}"]
        assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"] <= spec["partitions"]
        (trigger,) = scaled["triggers"]
        assert trigger["metadata"]["lagThreshold"] == str(spec["scaling"]["lagThreshold"])
        assert trigger["authenticationRef"]["name"] == "sluiceway-kafka"


def test_secrets_come_from_kubernetes_secrets_and_never_sit_in_the_config_map(
    secured: list[dict[str, Any]],
) -> None:
    (config_map,) = of_kind(secured, "ConfigMap")
    settings_text = config_map["data"]["settings.yaml"]
    assert "password" not in settings_text
    assert "secret_key" not in settings_text
    (authentication,) = of_kind(secured, "TriggerAuthentication")
    references = {r["parameter"]: r["name"] for r in authentication["spec"]["secretTargetRef"]}
    assert references["password"] == "sluiceway-kafka"
    assert references["ca"] == "sluiceway-kafka-ca"
    (scaler_secret,) = of_kind(secured, "Secret")
    assert scaler_secret["stringData"] == {
        "sasl": "scram_sha512",
        "tls": "enable",
        "username": "worker",
    }
    for workload in [*of_kind(secured, "StatefulSet"), *of_kind(secured, "Deployment")]:
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        from_secrets = {
            e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
            for e in container["env"]
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert from_secrets == {
            "SLUICEWAY_OBJECT_STORE__SECRET_KEY": "sluiceway-s3",
            "SLUICEWAY_KAFKA__SASL_PASSWORD": "sluiceway-kafka",
            "SLUICEWAY_BACKENDS__VLLM__API_KEY": "sluiceway-vllm",
        }


@pytest.mark.parametrize(
    ("override", "refusal"),
    [
        ("models.invoice_risk.scaling.maxReplicas=7", "exceeds its partitions"),
        ("models.invoice_risk.scaling.minReplicas=0", "minReplicas must be >= 1"),
        ("kafka.saslMechanism=GSSAPI", "KEDA's scaler takes PLAIN or SCRAM"),
        ("objectStore.secretKeySecret=", "objectStore.secretKeySecret is required"),
    ],
)
def test_values_that_cannot_work_are_refused_at_render_time(
    helm: Path, override: str, refusal: str
) -> None:
    rendered = render(helm, "--set", override, "--set", "kafka.passwordSecret=p")
    assert rendered.returncode != 0
    assert refusal in rendered.stderr


def test_a_worker_without_an_instance_id_stays_a_dynamic_member() -> None:
    """Outside the chart (no pod name), the worker's group membership is as it always was."""
    settings = load_demo_settings()
    worker = InferenceWorker(
        settings,
        ["scaler"],
        {"triton": object()},  # type: ignore[dict-item]
        object(),  # type: ignore[arg-type]
        clock=FakeClock(),
    )
    built = worker._consumer_config(worker_group_id(settings.namespace, "scaler"))
    assert "group.instance.id" not in built
    assert built["group.id"] == "inference.worker.scaler"
