"""Least-privilege Kafka ACLs, derived from the settings (``sluiceway acl plan``).

:func:`plan` is pure: settings (and which models each connector serves) in, a sorted list of
:class:`Grant` out; :mod:`pipeline.kafka.acl_admin` turns it into ``AclBinding``\\ s on a
cluster. One principal per process kind:

``worker-<model>``
    reads its model's requests and batch topics (group ``<ns>.worker.<model>``) and the control
    topic; writes its results, dead letters and the SDK's reply topics; with exactly-once,
    transactional ids ``<ns>.worker.<model>-*``.
``connector-<name>``
    writes the requests of the models it serves (and reads them back to skip duplicates),
    reads their results for writeback, writes their dead letters, their invalidations and the
    shared checkpoints.
``monitor``
    reads results and feedback of every model, writes drift reports and control events, and
    owns its faust topics and group (``<ns>-monitor*``).
``batch``
    writes every model's batch topic and the batch progress log in transactions
    (``<ns>.batch-runner.*``), reads results, dead letters and invalidations.
``client``
    the SDK: writes requests and feedback, reads results, invalidations and its reply topics.

Each principal may also CREATE exactly the topics its process ensures at start-up, with the
same names (creating an existing topic changes nothing), and every producer gets the
cluster's IDEMPOTENT_WRITE (librdkafka's producers are idempotent).

Model topics are only ever granted by *literal* name: a prefix ``<ns>.a.`` would also cover
the topics of a model called ``a.b``. The few prefixes there are (reply topics, throwaway
group ids, transactional ids) are checked against every other principal's resources, and a
plan where a prefix of one principal covers a resource granted to another (a model named
``replies``, or models ``a`` and ``a-b`` with exactly-once) is refused with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from pipeline.principals import (
    BATCH,
    CLIENT,
    CONNECTOR_PREFIX,
    MONITOR,
    WORKER_PREFIX,
    connector_principal,
    worker_principal,
)
from pipeline.settings import Settings
from pipeline.topics import (
    ModelTopics,
    batch_progress_topic,
    control_topic,
    drift_topic,
)
from schemas.errors import SluicewayError

PRINCIPAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""What a principal name may be: it is a SCRAM user, a certificate CN and a JWT ``sub`` at
once, and a file name under the stack's secrets folder, so nothing that needs escaping."""

RESOURCE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
"""Kafka's legal topic characters and length; group and transactional ids here use the same."""

MANAGED_PRINCIPAL_PREFIXES = (WORKER_PREFIX, CONNECTOR_PREFIX)
"""Principals ``acl apply`` owns besides :data:`FIXED_PRINCIPALS`: stale bindings of a
``worker-*`` or ``connector-*`` principal that the plan no longer names are its own."""
FIXED_PRINCIPALS = (MONITOR, BATCH, CLIENT)

CLUSTER_NAME = "kafka-cluster"


class AclPlanError(SluicewayError):
    """The settings cannot be turned into least-privilege ACLs; the message says why."""


class ResourceType(StrEnum):
    TOPIC = "TOPIC"
    GROUP = "GROUP"
    TRANSACTIONAL_ID = "TRANSACTIONAL_ID"
    CLUSTER = "CLUSTER"


class PatternType(StrEnum):
    LITERAL = "LITERAL"
    PREFIXED = "PREFIXED"


class Operation(StrEnum):
    READ = "READ"
    WRITE = "WRITE"
    CREATE = "CREATE"
    DESCRIBE = "DESCRIBE"
    IDEMPOTENT_WRITE = "IDEMPOTENT_WRITE"


@dataclass(frozen=True, order=True)
class Grant:
    """ALLOW ``operation`` on a resource to ``User:<principal>`` from any host."""

    principal: str
    resource_type: ResourceType
    pattern_type: PatternType
    resource_name: str
    operation: Operation

    def covers(self, resource_type: ResourceType, name: str) -> bool:
        if resource_type is not self.resource_type:
            return False
        if self.pattern_type is PatternType.PREFIXED:
            return name.startswith(self.resource_name)
        return name == self.resource_name

    def line(self) -> str:
        return (
            f"User:{self.principal:<24} {self.operation:<16} {self.resource_type:<16} "
            f"{self.pattern_type:<8} {self.resource_name}"
        )


def checkpoint_topic(namespace: str) -> str:
    """The connectors' shared checkpoint topic (``connectors/common/checkpoint.py`` names it
    the same way; pipeline code does not import connector packages)."""
    return f"{namespace}.connectors.checkpoints"


def monitor_app_id(namespace: str) -> str:
    """The faust app id of the monitor: its group id and the prefix of its own topics."""
    return f"{namespace}-monitor"


def principals(settings: Settings, connectors: Mapping[str, Sequence[str]]) -> list[str]:
    """Every principal the plan gives rights to, ``admin`` (a super user) not included."""
    return sorted(
        [
            *(worker_principal(model) for model in settings.models),
            *(connector_principal(name) for name in connectors),
            *FIXED_PRINCIPALS,
        ]
    )


def plan(settings: Settings, connectors: Mapping[str, Sequence[str]]) -> list[Grant]:
    """The least-privilege grants for ``settings``; ``connectors`` maps a connector's name (its
    ``--name``) to the models it serves. Raises :class:`AclPlanError` for a name that is not
    a legal principal or topic, an unknown model, or a prefix that would reach too far."""
    namespace = settings.namespace
    models = sorted(settings.models)
    for model in models:
        _check_name("model", model, namespace)
    for name, served in connectors.items():
        _check_name("connector", name, namespace)
        unknown = sorted(set(served) - set(models))
        if unknown:
            raise AclPlanError(
                f"connector {name!r} serves {', '.join(map(repr, unknown))}, which the "
                f"settings do not define (models: {', '.join(models) or 'none'})"
            )
    grants: set[Grant] = set()
    for model in models:
        grants |= _worker(settings, model)
    for name, served in connectors.items():
        grants |= _connector(namespace, name, sorted(set(served)))
    grants |= _monitor(namespace, models)
    grants |= _batch(namespace, models)
    grants |= _client(namespace, models)
    ordered = sorted(grants)
    _check_prefixes(ordered)
    return ordered


# ---------------------------------------------------------------------------- per principal

_R, _W, _C, _D = Operation.READ, Operation.WRITE, Operation.CREATE, Operation.DESCRIBE


def _topic(principal: str, name: str, *operations: Operation) -> set[Grant]:
    return {
        Grant(principal, ResourceType.TOPIC, PatternType.LITERAL, name, operation)
        for operation in (*operations, _D)
    }


def _topic_prefix(principal: str, prefix: str, *operations: Operation) -> set[Grant]:
    return {
        Grant(principal, ResourceType.TOPIC, PatternType.PREFIXED, prefix, operation)
        for operation in (*operations, _D)
    }


def _group(principal: str, name: str, *, prefixed: bool = False) -> set[Grant]:
    pattern = PatternType.PREFIXED if prefixed else PatternType.LITERAL
    return {Grant(principal, ResourceType.GROUP, pattern, name, _R)}


def _transactional_prefix(principal: str, prefix: str) -> set[Grant]:
    return {
        Grant(principal, ResourceType.TRANSACTIONAL_ID, PatternType.PREFIXED, prefix, operation)
        for operation in (_W, _D)
    }


def _idempotent(principal: str) -> set[Grant]:
    return {
        Grant(
            principal,
            ResourceType.CLUSTER,
            PatternType.LITERAL,
            CLUSTER_NAME,
            Operation.IDEMPOTENT_WRITE,
        )
    }


def _model_topics_created(principal: str, topics: ModelTopics) -> set[Grant]:
    """CREATE on the four topics ``model_topic_specs`` ensures (workers, connectors, batch)."""
    return set().union(
        *(
            _topic(principal, name, _C)
            for name in (topics.requests, topics.batch, topics.results, topics.dlq)
        )
    )


def _worker(settings: Settings, model: str) -> set[Grant]:
    namespace = settings.namespace
    principal = worker_principal(model)
    topics = ModelTopics(namespace, model)
    grants = (
        _model_topics_created(principal, topics)
        | _topic(principal, topics.requests, _R)
        | _topic(principal, topics.batch, _R)
        | _topic(principal, topics.results, _W)
        | _topic(principal, topics.dlq, _W)
        | _topic(principal, control_topic(namespace), _R, _C)
        | _topic_prefix(principal, f"{namespace}.replies.", _W)
        | _group(principal, f"{namespace}.worker.{model}")
        | _group(principal, "sluiceway-control-", prefixed=True)
        | _idempotent(principal)
    )
    sink = settings.models[model].payload_log_sink
    if sink is not None and sink.startswith("topic:"):
        # pipeline/payload_log.py: sampled request/response pairs (the topic is the operator's).
        grants |= _topic(principal, sink.removeprefix("topic:"), _W)
    if settings.workers.exactly_once:
        # workers/inference/worker.py: "<ns>.worker.<models joined by ->-<worker id>"; in a
        # secured deployment each worker process serves one model under its own principal.
        grants |= _transactional_prefix(principal, f"{namespace}.worker.{model}-")
    return grants


def _connector(namespace: str, name: str, served: Sequence[str]) -> set[Grant]:
    principal = connector_principal(name)
    grants = (
        _topic(principal, checkpoint_topic(namespace), _R, _W, _C)
        | _group(principal, f"{namespace}.connector.{name}.writeback")
        | _group(principal, f"sluiceway-salesforce-{name}")
        | _group(principal, f"sluiceway-checkpoints-{name}")
        | _group(principal, "sluiceway-dedupe-", prefixed=True)
        | _idempotent(principal)
    )
    for model in served:
        topics = ModelTopics(namespace, model)
        grants |= (
            _model_topics_created(principal, topics)
            # Read back too: the SAP connector skips events whose request is already there.
            | _topic(principal, topics.requests, _W, _R)
            | _topic(principal, topics.results, _R)
            | _topic(principal, topics.dlq, _W)
            # Created by the connector that first reports a deleted or cancelled record.
            | _topic(principal, topics.invalidations, _W, _C)
        )
    return grants


def _monitor(namespace: str, models: Sequence[str]) -> set[Grant]:
    app_id = monitor_app_id(namespace)
    grants = (
        _topic(MONITOR, drift_topic(namespace), _W, _C)
        | _topic(MONITOR, control_topic(namespace), _R, _W, _C)
        # faust's changelog and assignor topics are "<app id>-<table>-changelog" and so on.
        | _topic_prefix(MONITOR, f"{app_id}-", _R, _W, _C)
        | _group(MONITOR, app_id)
        | _group(MONITOR, "sluiceway-monitor-control-", prefixed=True)
        | _idempotent(MONITOR)
    )
    for model in models:
        topics = ModelTopics(namespace, model)
        grants |= _topic(MONITOR, topics.results, _R) | _topic(MONITOR, topics.feedback, _R, _C)
    return grants


def _batch(namespace: str, models: Sequence[str]) -> set[Grant]:
    runner = f"{namespace}.batch-runner."
    grants = (
        _topic(BATCH, batch_progress_topic(namespace), _R, _W, _C)
        | _transactional_prefix(BATCH, runner)
        | _group(BATCH, runner, prefixed=True)
        | _idempotent(BATCH)
    )
    for model in models:
        topics = ModelTopics(namespace, model)
        grants |= (
            _model_topics_created(BATCH, topics)
            | _topic(BATCH, topics.batch, _W)
            | _topic(BATCH, topics.results, _R)
            | _topic(BATCH, topics.dlq, _R)
            | _topic(BATCH, topics.invalidations, _R)
        )
    return grants


def _client(namespace: str, models: Sequence[str]) -> set[Grant]:
    grants = (
        _topic_prefix(CLIENT, f"{namespace}.replies.", _R, _C)
        | _group(CLIENT, "sluiceway-client-", prefixed=True)
        | _group(CLIENT, "sluiceway-subscriber-", prefixed=True)
        | _idempotent(CLIENT)
    )
    for model in models:
        topics = ModelTopics(namespace, model)
        grants |= (
            _topic(CLIENT, topics.requests, _W)
            | _topic(CLIENT, topics.results, _R)
            | _topic(CLIENT, topics.feedback, _W)
            | _topic(CLIENT, topics.invalidations, _R)
        )
    return grants


# ---------------------------------------------------------------------------- checks


def _check_name(kind: str, name: str, namespace: str) -> None:
    principal = worker_principal(name) if kind == "model" else connector_principal(name)
    if not (
        PRINCIPAL_NAME.fullmatch(name)
        and PRINCIPAL_NAME.fullmatch(principal)
        and RESOURCE_NAME.fullmatch(f"{namespace}.{name}.feedback")
    ):
        raise AclPlanError(
            f"{kind} name {name!r} cannot be a Kafka principal and topic name: use letters, "
            "digits, '.', '_' and '-', starting with a letter or digit"
        )


def _check_prefixes(grants: Iterable[Grant]) -> None:
    """Refuse a plan where one principal's prefix reaches a resource granted to another.

    Identical prefixes shared on purpose (every worker writes ``<ns>.replies.``, which the
    SDK reads) are fine; a prefix covering another principal's literal resource, or a longer
    or shorter prefix of another principal's, means a name (a model's, a connector's)
    collides with a name the plan derives, and the rights would leak.
    """
    granted = list(grants)
    prefixes = {
        (grant.principal, grant.resource_type, grant.resource_name)
        for grant in granted
        if grant.pattern_type is PatternType.PREFIXED
    }
    for owner, resource_type, prefix in sorted(prefixes):
        for other in granted:
            if other.principal == owner or other.resource_type is not resource_type:
                continue
            name = other.resource_name
            if other.pattern_type is PatternType.LITERAL:
                clash = name.startswith(prefix)
            else:
                clash = name != prefix and (name.startswith(prefix) or prefix.startswith(name))
            if clash:
                raise AclPlanError(
                    f"the {resource_type.lower()} prefix {prefix!r} of {owner} would also cover "
                    f"{name!r} of {other.principal}: rename the model or connector whose name "
                    "makes them overlap"
                )
