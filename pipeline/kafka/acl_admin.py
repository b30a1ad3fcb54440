"""Applying a plan of :mod:`pipeline.kafka.acls` to a cluster with the AdminClient.

Idempotent: bindings the cluster already has are left alone, missing ones are created.
Bindings of principals the plan owns (``monitor``, ``batch``, ``client``, ``worker-*``,
``connector-*``) that the plan no longer contains are *stale*: reported, and deleted only
when asked (``prune``), so a hand-made exception is never removed by surprise. Bindings of any
other principal are not ours and never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._acl import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
)
from confluent_kafka.admin._resource import ResourcePatternType, ResourceType
from confluent_kafka.admin._scram import (
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from pipeline.kafka import acls, clients
from pipeline.kafka.acls import Grant, Operation, PatternType
from pipeline.kafka.exceptions import TopicAdminError
from pipeline.settings import KafkaSettings

SCRAM_ITERATIONS = 8192
_RESOURCE_TYPES = {
    acls.ResourceType.TOPIC: ResourceType.TOPIC,
    acls.ResourceType.GROUP: ResourceType.GROUP,
    acls.ResourceType.TRANSACTIONAL_ID: ResourceType.TRANSACTIONAL_ID,
    acls.ResourceType.CLUSTER: ResourceType.BROKER,
}
_PATTERNS = {
    PatternType.LITERAL: ResourcePatternType.LITERAL,
    PatternType.PREFIXED: ResourcePatternType.PREFIXED,
}
_OPERATIONS = {operation: AclOperation[operation.value] for operation in Operation}

BindingKey = tuple[str, str, str, str, str, str, str]
"""(resource type, name, pattern, principal, host, operation, permission), comparable."""


@dataclass
class ApplyReport:
    created: list[AclBinding] = field(default_factory=list)
    unchanged: int = 0
    stale: list[AclBinding] = field(default_factory=list)
    removed: list[AclBinding] = field(default_factory=list)
    users_created: list[str] = field(default_factory=list)


def binding(grant: Grant) -> AclBinding:
    return AclBinding(
        _RESOURCE_TYPES[grant.resource_type],
        grant.resource_name,
        _PATTERNS[grant.pattern_type],
        f"User:{grant.principal}",
        "*",
        _OPERATIONS[grant.operation],
        AclPermissionType.ALLOW,
    )


def key_of(found: AclBinding) -> BindingKey:
    return (
        _enum_name(found.restype),
        found.name,
        _enum_name(found.resource_pattern_type),
        found.principal,
        found.host,
        _enum_name(found.operation),
        _enum_name(found.permission_type),
    )


def _enum_name(value: object) -> str:
    """The enum member's name (the client library types these as enum, str or int)."""
    return str(getattr(value, "name", value))


def filter_of(found: AclBinding) -> AclBindingFilter:
    """The filter matching exactly ``found`` (to describe or delete that one binding)."""
    return AclBindingFilter(
        found.restype,
        found.name,
        found.resource_pattern_type,
        found.principal,
        found.host,
        found.operation,
        found.permission_type,
    )


def owned(principal: str) -> bool:
    """Whether ``User:<name>`` is one of the principals ``acl apply`` manages."""
    name = principal.removeprefix("User:")
    return principal.startswith("User:") and (
        name in acls.FIXED_PRINCIPALS or name.startswith(acls.MANAGED_PRINCIPAL_PREFIXES)
    )


def stale_bindings(
    existing: Iterable[AclBinding], desired: Iterable[AclBinding], namespace: str | None = None
) -> list[AclBinding]:
    """Existing bindings of principals we own that the plan does not contain; with
    ``namespace``, only those on the namespace's own resources (``<ns>.*``, ``<ns>-*``): a
    plan for one namespace says nothing about another's on the same cluster."""
    wanted = {key_of(item) for item in desired}
    return sorted(
        (
            item
            for item in existing
            if owned(item.principal)
            and key_of(item) not in wanted
            and (namespace is None or _in_namespace(item.name, namespace))
        ),
        key=key_of,
    )


def _in_namespace(resource: str, namespace: str) -> bool:
    return resource.startswith((f"{namespace}.", f"{namespace}-"))


def apply(
    admin_kafka: KafkaSettings,
    grants: Sequence[Grant],
    *,
    prune: bool = False,
    namespace: str | None = None,
    scram_users: Sequence[str] = (),
    password_of: Callable[[str], str] | None = None,
    timeout_s: float = 30.0,
) -> ApplyReport:
    """Make the cluster hold ``grants``; with ``password_of``, also create the SCRAM users in
    ``scram_users`` that the cluster does not know yet (their passwords are never changed).
    With ``namespace``, stale bindings are looked for on that namespace's resources only."""
    admin = clients.admin(admin_kafka)
    report = ApplyReport()
    if password_of is not None and scram_users:
        report.users_created = _ensure_scram_users(admin, scram_users, password_of, timeout_s)
    desired = [binding(grant) for grant in grants]
    # None matches any name, principal and host (the library's stubs say str only).
    everything = AclBindingFilter(
        ResourceType.ANY,
        None,  # type: ignore[arg-type]
        ResourcePatternType.ANY,
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        AclOperation.ANY,
        AclPermissionType.ANY,
    )
    try:
        existing: list[AclBinding] = admin.describe_acls(
            everything, request_timeout=timeout_s
        ).result(timeout=timeout_s)
    except KafkaException as exc:
        raise TopicAdminError(f"describing ACLs failed: {exc.args[0]}") from exc
    have = {key_of(item) for item in existing}
    missing = [item for item in desired if key_of(item) not in have]
    report.unchanged = len(desired) - len(missing)
    if missing:
        for created, future in admin.create_acls(missing, request_timeout=timeout_s).items():
            try:
                future.result(timeout=timeout_s)
            except KafkaException as exc:
                raise TopicAdminError(f"creating ACL {created} failed: {exc.args[0]}") from exc
            report.created.append(created)
    report.stale = stale_bindings(existing, desired, namespace)
    if prune and report.stale:
        filters = [filter_of(item) for item in report.stale]
        for _, future in admin.delete_acls(filters, request_timeout=timeout_s).items():
            try:
                report.removed.extend(future.result(timeout=timeout_s))
            except KafkaException as exc:
                raise TopicAdminError(f"deleting stale ACLs failed: {exc.args[0]}") from exc
    return report


def _ensure_scram_users(
    admin: AdminClient,
    users: Sequence[str],
    password_of: Callable[[str], str],
    timeout_s: float,
) -> list[str]:
    try:
        described = admin.describe_user_scram_credentials(None, request_timeout=timeout_s)
        known = set(described.result(timeout=timeout_s))  # type: ignore[union-attr]
    except KafkaException as exc:
        raise TopicAdminError(f"describing SCRAM users failed: {exc.args[0]}") from exc
    missing = sorted(set(users) - known)
    if not missing:
        return []
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
    upserts = [
        UserScramCredentialUpsertion(user, info, password_of(user).encode("ascii"))
        for user in missing
    ]
    futures = admin.alter_user_scram_credentials(upserts, request_timeout=timeout_s)  # type: ignore[arg-type]
    for user, future in futures.items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            raise TopicAdminError(f"creating SCRAM user {user!r} failed: {exc.args[0]}") from exc
    return missing
