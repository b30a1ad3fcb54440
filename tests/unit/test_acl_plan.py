"""The least-privilege ACL plan: each principal gets exactly what its process needs, and no
name, however odd, widens a grant to another model's resources."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka.admin._acl import AclBinding, AclOperation, AclPermissionType
from confluent_kafka.admin._resource import ResourcePatternType, ResourceType

from devkit.settings import load_local_settings
from pipeline.kafka import acl_admin
from pipeline.kafka.acls import (
    AclPlanError,
    Grant,
    Operation,
    PatternType,
    plan,
    principals,
)
from pipeline.kafka.acls import ResourceType as Resource
from pipeline.settings import ModelSettings, Settings
from pipeline.topics import ModelTopics
from schemas.errors import SluicewayError
from sluiceway.acl_cmd import parse_connectors

NS = "inference"
DEMO_CONNECTORS = {"sap": ("invoice_risk",), "salesforce": ("case_summary",)}


def _settings(*models: str, exactly_once: bool = False, **overrides: Any) -> Settings:
    settings = load_local_settings(workers={"exactly_once": exactly_once}, **overrides)
    if models:
        settings = settings.model_copy(update={"models": {m: ModelSettings() for m in models}})
    return settings


def _rights(grants: list[Grant], principal: str) -> set[tuple[str, str, str, str]]:
    return {
        (g.operation.value, g.resource_type.value, g.pattern_type.value, g.resource_name)
        for g in grants
        if g.principal == principal
    }


def _who(grants: list[Grant], operation: Operation, topic: str) -> set[str]:
    """The principals allowed ``operation`` on ``topic``, by literal name or prefix."""
    return {
        g.principal for g in grants if g.operation is operation and g.covers(Resource.TOPIC, topic)
    }


def test_a_worker_gets_exactly_its_models_topics_group_and_the_reply_prefix() -> None:
    grants = plan(_settings("scaler", "other"), {})
    topics = ModelTopics(NS, "scaler")
    literal = {
        (op, "TOPIC", "LITERAL", topic)
        for topic, ops in {
            topics.requests: ("READ", "DESCRIBE", "CREATE"),
            topics.batch: ("READ", "DESCRIBE", "CREATE"),
            topics.results: ("WRITE", "DESCRIBE", "CREATE"),
            topics.dlq: ("WRITE", "DESCRIBE", "CREATE"),
            f"{NS}.control": ("READ", "DESCRIBE", "CREATE"),
        }.items()
        for op in ops
    }
    assert _rights(grants, "worker-scaler") == literal | {
        ("WRITE", "TOPIC", "PREFIXED", f"{NS}.replies."),
        ("DESCRIBE", "TOPIC", "PREFIXED", f"{NS}.replies."),
        ("READ", "GROUP", "LITERAL", f"{NS}.worker.scaler"),
        ("READ", "GROUP", "PREFIXED", "sluiceway-control-"),
        ("IDEMPOTENT_WRITE", "CLUSTER", "LITERAL", "kafka-cluster"),
    }


def test_exactly_once_adds_the_workers_transactional_id_prefix_only_then() -> None:
    without = _rights(plan(_settings("scaler"), {}), "worker-scaler")
    with_eos = _rights(plan(_settings("scaler", exactly_once=True), {}), "worker-scaler")
    assert with_eos - without == {
        ("WRITE", "TRANSACTIONAL_ID", "PREFIXED", f"{NS}.worker.scaler-"),
        ("DESCRIBE", "TRANSACTIONAL_ID", "PREFIXED", f"{NS}.worker.scaler-"),
    }
    assert not any("TRANSACTIONAL_ID" in right for right in without)


def test_only_a_models_worker_writes_its_results_and_dead_letters_only_it_and_connectors() -> None:
    grants = plan(_settings(), DEMO_CONNECTORS)
    for model in ("scaler", "invoice_risk", "case_summary"):
        topics = ModelTopics(NS, model)
        assert _who(grants, Operation.WRITE, topics.results) == {f"worker-{model}"}
        serving = {f"connector-{n}" for n, served in DEMO_CONNECTORS.items() if model in served}
        assert _who(grants, Operation.WRITE, topics.dlq) == {f"worker-{model}"} | serving
        assert _who(grants, Operation.WRITE, topics.requests) == {"client"} | serving
        assert _who(grants, Operation.WRITE, topics.batch) == {"batch"}
        assert _who(grants, Operation.READ, topics.requests) == {f"worker-{model}"} | serving
        assert _who(grants, Operation.READ, topics.results) == {"monitor", "batch", "client"} | (
            serving
        )


def test_only_the_monitor_writes_control_and_drift() -> None:
    grants = plan(_settings(), DEMO_CONNECTORS)
    assert _who(grants, Operation.WRITE, f"{NS}.control") == {"monitor"}
    assert _who(grants, Operation.WRITE, f"{NS}.drift") == {"monitor"}
    assert _who(grants, Operation.READ, f"{NS}.control") == {
        "monitor",
        "worker-scaler",
        "worker-invoice_risk",
        "worker-case_summary",
    }


def test_a_connector_touches_only_the_models_it_serves() -> None:
    grants = plan(_settings(), {"sap": ("invoice_risk",)})
    sap = _rights(grants, "connector-sap")
    names = {right[3] for right in sap}
    assert not any(".scaler." in name or ".case_summary." in name for name in names)
    served = ModelTopics(NS, "invoice_risk")
    assert ("WRITE", "TOPIC", "LITERAL", served.requests) in sap
    assert ("READ", "TOPIC", "LITERAL", served.results) in sap
    assert ("WRITE", "TOPIC", "LITERAL", served.results) not in sap
    assert ("WRITE", "TOPIC", "LITERAL", f"{NS}.connectors.checkpoints") in sap
    assert ("READ", "GROUP", "LITERAL", f"{NS}.connector.sap.writeback") in sap


def test_only_the_serving_connectors_write_invalidations_and_the_sdk_and_batch_read_them() -> None:
    connectors = {**DEMO_CONNECTORS, "sap-eu": ("invoice_risk",)}
    grants = plan(_settings(), connectors)
    for model in ("scaler", "invoice_risk", "case_summary"):
        topic = ModelTopics(NS, model).invalidations
        serving = {f"connector-{n}" for n, served in connectors.items() if model in served}
        assert _who(grants, Operation.WRITE, topic) == serving
        assert _who(grants, Operation.CREATE, topic) == serving
        assert _who(grants, Operation.READ, topic) == {"client", "batch"}
        assert _who(grants, Operation.DESCRIBE, topic) == serving | {"client", "batch"}
    sap = _rights(grants, "connector-sap")
    invalidation_rights = {right for right in sap if right[3].endswith(".invalidations")}
    assert invalidation_rights == {
        (op, "TOPIC", "LITERAL", f"{NS}.invoice_risk.invalidations")
        for op in ("WRITE", "CREATE", "DESCRIBE")
    }


def test_a_connector_serving_an_unknown_model_is_refused() -> None:
    with pytest.raises(AclPlanError, match="'ghost'"):
        plan(_settings(), {"sap": ("invoice_risk", "ghost")})


@pytest.mark.parametrize(
    ("first", "second"), [("a", "ab"), ("a", "a.b"), ("a", "a-b"), ("a", "a_b"), ("x.y", "x")]
)
def test_a_models_grants_never_reach_a_model_whose_name_extends_it(first: str, second: str) -> None:
    grants = plan(_settings(first, second), {"c": (first,)})
    theirs = ModelTopics(NS, second)
    for topic in (
        theirs.requests,
        theirs.batch,
        theirs.results,
        theirs.dlq,
        theirs.feedback,
        theirs.invalidations,
    ):
        for operation in Operation:
            allowed = _who(grants, operation, topic)
            assert f"worker-{first}" not in allowed, (operation, topic)
            assert "connector-c" not in allowed, (operation, topic)
    group = f"{NS}.worker.{second}"
    assert not any(
        g.principal == f"worker-{first}" and g.covers(Resource.GROUP, group) for g in grants
    )


def test_model_topics_are_granted_only_by_literal_name() -> None:
    grants = plan(_settings("a", "ab", "a.b"), {"c": ("a",)})
    prefixes = {g.resource_name for g in grants if g.pattern_type is PatternType.PREFIXED}
    assert prefixes == {
        f"{NS}.replies.",
        f"{NS}-monitor-",
        f"{NS}.batch-runner.",
        "sluiceway-control-",
        "sluiceway-dedupe-",
        "sluiceway-monitor-control-",
        "sluiceway-client-",
        "sluiceway-subscriber-",
    }


def test_exactly_once_with_models_a_and_a_dash_b_is_refused() -> None:
    """The transactional id prefix ``<ns>.worker.a-`` would cover model ``a-b``'s ids."""
    with pytest.raises(AclPlanError, match=r"worker\.a-"):
        plan(_settings("a", "a-b", exactly_once=True), {})
    assert plan(_settings("a", "ab", exactly_once=True), {})


@pytest.mark.parametrize("model", ["replies"])
def test_a_model_whose_topics_fall_under_the_reply_prefix_is_refused(model: str) -> None:
    with pytest.raises(AclPlanError, match="replies"):
        plan(_settings(model), {})


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a*",
        "a,b",
        "../etc",
        "a b",
        "modèle",
        "-leading",
        ".hidden",
        "a/b",
        "a=b",
        "x" * 200,
        "a\nb",
    ],
)
def test_odd_model_and_connector_names_are_refused(name: str) -> None:
    with pytest.raises(AclPlanError, match="cannot be a Kafka principal"):
        plan(_settings(name), {})
    with pytest.raises(AclPlanError, match="cannot be a Kafka principal"):
        plan(_settings("scaler"), {name: ("scaler",)})


def test_the_plan_is_sorted_without_duplicates_and_stable() -> None:
    settings = _settings()
    first = plan(settings, DEMO_CONNECTORS)
    assert first == sorted(set(first))
    assert plan(settings, dict(reversed(list(DEMO_CONNECTORS.items())))) == first


def test_principals_are_one_per_model_one_per_connector_and_the_fixed_three() -> None:
    assert principals(_settings("a", "b"), {"sap": ("a",)}) == [
        "batch",
        "client",
        "connector-sap",
        "monitor",
        "worker-a",
        "worker-b",
    ]


def test_the_namespace_prefixes_every_topic_group_and_transactional_id() -> None:
    grants = plan(_settings(namespace="acme.prod", exactly_once=True), DEMO_CONNECTORS)
    for grant in grants:
        if grant.resource_type is Resource.TOPIC:
            assert grant.resource_name.startswith("acme.prod"), grant
        if grant.resource_type is Resource.TRANSACTIONAL_ID:
            assert grant.resource_name.startswith("acme.prod."), grant


def test_connector_flags_replace_the_setting_and_bad_ones_are_refused() -> None:
    # The local stack's connectors are the demo's; without flags, they are what is planned.
    assert load_local_settings().stack.kafka_connectors == DEMO_CONNECTORS
    assert parse_connectors(None, DEMO_CONNECTORS) == DEMO_CONNECTORS
    assert parse_connectors(["erp=scaler,invoice_risk"], DEMO_CONNECTORS) == {
        "erp": ("scaler", "invoice_risk")
    }
    for bad in (["erp"], ["=scaler"], ["erp="], ["erp=a", "erp=b"]):
        with pytest.raises(SluicewayError):
            parse_connectors(bad, DEMO_CONNECTORS)


def _binding(principal: str, name: str = "t") -> AclBinding:
    return AclBinding(
        ResourceType.TOPIC,
        name,
        ResourcePatternType.LITERAL,
        principal,
        "*",
        AclOperation.READ,
        AclPermissionType.ALLOW,
    )


def test_stale_bindings_are_only_those_of_principals_we_own() -> None:
    wanted = [acl_admin.binding(g) for g in plan(_settings("a"), {})]
    existing = [
        *wanted,
        _binding("User:worker-gone"),
        _binding("User:connector-old"),
        _binding("User:monitor", "inference.elsewhere"),
        _binding("User:alice"),
        _binding("User:admin"),
        _binding("Group:worker-x"),
    ]
    stale = acl_admin.stale_bindings(existing, wanted)
    assert sorted(b.principal for b in stale) == [
        "User:connector-old",
        "User:monitor",
        "User:worker-gone",
    ]
    # Scoped to the plan's namespace: another namespace's bindings on the cluster are its own.
    elsewhere = _binding("User:worker-b", "staging.b.requests")
    scoped = acl_admin.stale_bindings([*existing, elsewhere], wanted, "inference")
    assert sorted(b.principal for b in scoped) == ["User:monitor"]
    assert acl_admin.stale_bindings([elsewhere], wanted) == [elsewhere]


def test_a_grant_becomes_the_binding_it_names() -> None:
    grant = Grant(
        "worker-a", Resource.TOPIC, PatternType.PREFIXED, "inference.replies.", Operation.WRITE
    )
    assert acl_admin.key_of(acl_admin.binding(grant)) == (
        "TOPIC",
        "inference.replies.",
        "PREFIXED",
        "User:worker-a",
        "*",
        "WRITE",
        "ALLOW",
    )
    cluster = Grant(
        "batch", Resource.CLUSTER, PatternType.LITERAL, "kafka-cluster", Operation.IDEMPOTENT_WRITE
    )
    assert acl_admin.key_of(acl_admin.binding(cluster))[0] == "BROKER"
