"""The routing table: which model version serves live traffic, driven by control events.

Every worker folds the compacted ``<ns>.control`` topic into one of these. Folding is
idempotent and order-safe: each model keeps the decision with the newest ``issued_at_ms``,
so replaying the topic from the start, or seeing an event twice, gives the same table. A
manual pin outranks automatic decisions until a manual unpin (or another manual decision)
replaces it.

A decision may carry an ``idempotency_key`` (the monitor derives one from the rollback's model,
versions and breaching windows): a key the table has already seen is a no-op whatever the
decision's ``issued_at_ms``, so a rollback emitted twice (a monitor killed after producing it and
before recording that it did) takes effect once, even if an operator acted in between.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class RouteAction(StrEnum):
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    PIN = "pin"
    UNPIN = "unpin"
    CANARY = "canary"


@dataclass(frozen=True, kw_only=True)
class RouteDecision:
    model: str
    action: RouteAction
    version: str | None
    """The version that serves after this decision (``None`` only for ``unpin``)."""
    issued_at_ms: int
    manual: bool = False
    canary_version: str | None = None
    canary_fraction: float = 0.0
    reason: str = ""
    idempotency_key: str | None = None
    """The same key twice is one decision: the second is a no-op (see the module doc)."""

    def __post_init__(self) -> None:
        if self.action is not RouteAction.UNPIN and not self.version:
            raise ValueError(f"{self.action.value} needs a version")
        if self.action is RouteAction.CANARY and (
            not self.canary_version or not 0 < self.canary_fraction < 1
        ):
            raise ValueError("canary needs canary_version and 0 < canary_fraction < 1")


@dataclass(frozen=True)
class _Route:
    decision: RouteDecision
    pinned: bool


KEYS_PER_MODEL = 1024
"""Idempotency keys remembered per model (oldest forgotten first): far more than the rollbacks a
model sees between two restarts of the monitor that could repeat one."""


class RoutingTable:
    """Serving versions per model; ``default_versions`` apply until a decision arrives."""

    def __init__(self, default_versions: Mapping[str, str] | None = None) -> None:
        self._defaults = dict(default_versions or {})
        self._routes: dict[str, _Route] = {}
        self._keys: dict[str, OrderedDict[str, None]] = {}

    def apply(self, decision: RouteDecision) -> bool:
        """Fold one decision in; return whether it changed the table.

        A decision whose ``idempotency_key`` was seen before is a no-op. The key is remembered
        the first time it is seen, whether or not that decision changed the table (a rollback
        refused because of a pin stays refused when it is repeated after the unpin).
        """
        if decision.idempotency_key is not None:
            if self.has_seen(decision.model, decision.idempotency_key):
                return False  # the same decision, emitted again
            keys = self._keys.setdefault(decision.model, OrderedDict())
            keys[decision.idempotency_key] = None
            while len(keys) > KEYS_PER_MODEL:
                keys.popitem(last=False)
        current = self._routes.get(decision.model)
        if current is not None:
            if decision.issued_at_ms <= current.decision.issued_at_ms:
                return False  # stale or replayed
            if current.pinned and not decision.manual:
                return False  # an operator's pin outranks the monitor
        if decision.action is RouteAction.UNPIN:
            if current is None:
                return False
            self._routes[decision.model] = _Route(current.decision, pinned=False)
            return True
        self._routes[decision.model] = _Route(decision, decision.action is RouteAction.PIN)
        return True

    def version_for(self, model: str, routing_key: str = "") -> str | None:
        """The version that serves ``model``; a canary takes its fraction of routing keys."""
        route = self._routes.get(model)
        if route is None:
            return self._defaults.get(model)
        decision = route.decision
        if (
            decision.action is RouteAction.CANARY
            and decision.canary_version is not None
            and _bucket(routing_key) < decision.canary_fraction
        ):
            return decision.canary_version
        return decision.version

    def has_seen(self, model: str, idempotency_key: str) -> bool:
        """Whether a decision with this key was folded in (applied or not)."""
        return idempotency_key in self._keys.get(model, ())

    def is_pinned(self, model: str) -> bool:
        route = self._routes.get(model)
        return route is not None and route.pinned

    def snapshot(self) -> dict[str, str | None]:
        models = set(self._defaults) | set(self._routes)
        return {model: self.version_for(model) for model in sorted(models)}


def _bucket(routing_key: str) -> float:
    """A stable number in [0, 1) per key, so one entity always sees the same version."""
    digest = hashlib.blake2b(routing_key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
