"""Which mapping an SAP business event belongs to, and what kind of event it is. Pure.

One connector process serves several mappings over several SAP systems. A mapping is bound to
one system (its base URL and credentials, :mod:`connectors.sap.systems`); an event is routed
by its CloudEvents ``source`` (which system raised it: the system's ``event_sources``) and its
``type`` (the mapping's ``source.event_types``). The first route that takes both wins; an event
that no route takes is skipped and counted (``unmapped``), never dead-lettered: an Event Mesh
queue subscribed to a topic pattern carries event types nobody mapped, and every one of them
in the DLQ would bury the records that need a person.

The kind of an event comes from its type's action segment, as SAP names them
(``sap.s4.beh.supplierinvoice.v1.SupplierInvoice.Created.v1``): ``Created``, ``Changed`` and
everything else that still describes a live entity are scored; ``Canceled``/``Cancelled``
and ``Deleted`` invalidate the entity instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from connectors.common.mapping import Mapping
from connectors.sap.cloudevents import CloudEvent
from connectors.sap.odata import EntitySource


class EventKind(StrEnum):
    SCORE = "score"
    """The entity exists and (may have) changed: read it, score it."""
    CANCEL = "cancel"
    """The document was cancelled: an invalidation, no score."""
    DELETE = "delete"
    """The entity is gone: an invalidation, no score."""


_CANCEL_ACTIONS = frozenset({"canceled", "cancelled", "reversed"})
_DELETE_ACTIONS = frozenset({"deleted"})


def event_kind(event_type: str) -> EventKind:
    """The kind named by an SAP event type's action segment (the one before the version)."""
    segments = event_type.split(".")
    action = segments[-2] if len(segments) >= 2 else event_type
    lowered = action.lower()
    if lowered in _CANCEL_ACTIONS:
        return EventKind.CANCEL
    if lowered in _DELETE_ACTIONS:
        return EventKind.DELETE
    return EventKind.SCORE


@dataclass(frozen=True)
class RouteRule:
    """What a route takes: the mapping of one entity set on one system."""

    name: str
    """``<system>/<entity set>``, or ``""`` for the one mapping of ``--mapping``: it prefixes
    the entity in signed correlation ids, so a result names its route."""
    system: str
    mapping: Mapping
    source: EntitySource
    event_sources: tuple[str, ...] = ()
    """CloudEvents ``source`` values of the system; empty takes any source."""

    def takes(self, event: CloudEvent) -> bool:
        if self.event_sources and event.source not in self.event_sources:
            return False
        return not self.source.event_types or event.type in self.source.event_types


R = TypeVar("R", bound=RouteRule)


def route_for(routes: Sequence[R], event: CloudEvent) -> R | None:
    """The first route that takes ``event``, or ``None`` (skipped as unmapped)."""
    for route in routes:
        if route.takes(event):
            return route
    return None


def route_subject(route_name: str, predicate: str) -> str:
    """The subject a correlation id signs: route name, then the entity's key predicate."""
    return f"{route_name}{predicate}"


def split_subject(subject: str) -> tuple[str, str] | None:
    """``(route name, key predicate)`` of a signed subject, or ``None`` when it names none."""
    route_name, opening, rest = subject.partition("(")
    if not opening or not rest.endswith(")"):
        return None
    return route_name, opening + rest
