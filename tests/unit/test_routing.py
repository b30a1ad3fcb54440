from __future__ import annotations

import pytest

from pipeline.routing import RouteAction, RouteDecision, RoutingTable


def _decision(action: RouteAction, version: str | None, at: int, **kw: object) -> RouteDecision:
    return RouteDecision(model="fraud", action=action, version=version, issued_at_ms=at, **kw)  # type: ignore[arg-type]


def test_defaults_serve_until_a_decision_arrives() -> None:
    table = RoutingTable({"fraud": "1"})
    assert table.version_for("fraud") == "1"
    assert table.version_for("unknown") is None
    assert table.apply(_decision(RouteAction.PROMOTE, "2", at=10))
    assert table.version_for("fraud") == "2"


def test_replays_and_stale_events_change_nothing() -> None:
    table = RoutingTable({"fraud": "1"})
    promote = _decision(RouteAction.PROMOTE, "2", at=10)
    rollback = _decision(RouteAction.ROLLBACK, "1", at=20)
    for event in (promote, rollback, promote, rollback):
        table.apply(event)
    assert table.version_for("fraud") == "1"
    assert not table.apply(_decision(RouteAction.PROMOTE, "3", at=15))
    assert table.version_for("fraud") == "1"


def test_a_manual_pin_outranks_the_monitor_until_unpinned() -> None:
    table = RoutingTable({"fraud": "1"})
    table.apply(_decision(RouteAction.PIN, "2", at=10, manual=True))
    assert not table.apply(_decision(RouteAction.ROLLBACK, "1", at=20))
    assert table.version_for("fraud") == "2"
    assert table.is_pinned("fraud")
    assert table.apply(_decision(RouteAction.UNPIN, None, at=30, manual=True))
    assert table.apply(_decision(RouteAction.ROLLBACK, "1", at=40))
    assert table.version_for("fraud") == "1"


def test_canary_sends_a_stable_fraction_of_keys_to_the_new_version() -> None:
    table = RoutingTable()
    table.apply(_decision(RouteAction.CANARY, "1", at=1, canary_version="2", canary_fraction=0.2))
    versions = [table.version_for("fraud", f"invoice-{i}") for i in range(5000)]
    share = versions.count("2") / len(versions)
    assert 0.17 < share < 0.23
    assert all(table.version_for("fraud", f"invoice-{i}") == versions[i] for i in range(100))


def test_incomplete_decisions_are_refused() -> None:
    with pytest.raises(ValueError, match="needs a version"):
        _decision(RouteAction.PROMOTE, None, at=1)
    with pytest.raises(ValueError, match="canary needs"):
        _decision(RouteAction.CANARY, "1", at=1, canary_version="2", canary_fraction=1.5)


def test_the_same_rollback_applied_twice_changes_the_table_once() -> None:
    """A rollback emitted again (a monitor killed before it recorded the first) carries the same
    idempotency key and a later ``issued_at``: it is a no-op, even after an operator's decision
    that it would otherwise override."""
    table = RoutingTable({"fraud": "1"})
    table.apply(_decision(RouteAction.PROMOTE, "2", at=10, manual=True))
    rollback = _decision(RouteAction.ROLLBACK, "1", at=20, idempotency_key="rollback-abc")
    assert table.apply(rollback)
    assert table.version_for("fraud") == "1"
    assert table.has_seen("fraud", "rollback-abc")
    assert table.apply(_decision(RouteAction.PROMOTE, "3", at=30, manual=True))
    repeated = _decision(RouteAction.ROLLBACK, "1", at=40, idempotency_key="rollback-abc")
    assert not table.apply(repeated)
    assert table.version_for("fraud") == "3"
    # A different key is a different decision.
    assert table.apply(_decision(RouteAction.ROLLBACK, "1", at=50, idempotency_key="rollback-x"))
    assert table.version_for("fraud") == "1"


def test_a_key_refused_once_stays_refused() -> None:
    table = RoutingTable({"fraud": "1"})
    table.apply(_decision(RouteAction.PIN, "2", at=10, manual=True))
    refused = _decision(RouteAction.ROLLBACK, "1", at=20, idempotency_key="k")
    assert not table.apply(refused)
    table.apply(_decision(RouteAction.UNPIN, None, at=30, manual=True))
    assert not table.apply(_decision(RouteAction.ROLLBACK, "1", at=40, idempotency_key="k"))
    assert table.version_for("fraud") == "2"
    assert not table.has_seen("other", "k")
