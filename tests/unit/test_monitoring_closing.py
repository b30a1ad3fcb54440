"""Closing monitor windows without Kafka: the decision is written before the window is forgotten,
a window whose write failed is judged again, and a monitor killed right after emitting a
rollback does not roll back twice once restarted.

The tables are changelog fakes: a write is durable only once ``flush`` has run, and a "killed"
monitor restarts from what was durable (or, the other extreme, from everything it wrote).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from pipeline.monitoring.closing import (
    CloserSettings,
    JudgedWindow,
    WindowCloser,
    WindowKey,
    report_id_for,
    version_key,
)
from pipeline.monitoring.evidence import Breach, WindowSummary
from pipeline.monitoring.policy import PolicySettings, RollbackPolicy
from pipeline.routing import RouteAction, RouteDecision, RoutingTable
from schemas.models import ControlAction, ControlEvent, DriftDecision, DriftReport, ObjectRef
from tests.unit.fakes import FakeClock

WINDOW_MS = 2_000
GRACE_MS = 1_000
T0_MS = 1_700_000_000_000
MODEL = "invoice_risk"
SCORE_DRIFT = Breach("psi:score", 2.4, 0.2)

ODD_VERSIONS = ["a|b", "1/../x", "v" * 200, "βeta-ü-模型-🚀", '"quoted" \\ [1, 2]', "|", "a|b|3"]


# ---------------------------------------------------------------------------------- doubles


class ChangelogTable(MutableMapping[str, Any]):
    """A faust table as far as a crash is concerned: writes land in ``durable`` on flush."""

    def __init__(self, durable: dict[str, Any] | None = None) -> None:
        self.live: dict[str, Any] = json.loads(json.dumps(durable or {}))
        self.durable: dict[str, Any] = json.loads(json.dumps(durable or {}))

    def flush(self) -> None:
        self.durable = json.loads(json.dumps(self.live))

    def __getitem__(self, key: str) -> Any:
        return self.live[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.live[key] = json.loads(json.dumps(value))

    def __delitem__(self, key: str) -> None:
        del self.live[key]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.live))

    def __len__(self) -> int:
        return len(self.live)


class Killed(BaseException):
    """SIGKILL: nothing after it runs (a BaseException, so the closer cannot catch it)."""


@dataclass
class Outside:
    """What outlives a monitor: the object store, the drift topic, the control topic."""

    objects: dict[str, str] = field(default_factory=dict)
    drift: list[DriftReport] = field(default_factory=list)
    control: list[ControlEvent] = field(default_factory=list)


@dataclass
class Sink:
    outside: Outside
    routing: RoutingTable
    fail: set[str] = field(default_factory=set)
    """Calls that raise once: ``store_report``, ``send_report``, ``send_control``."""
    kill_after_control: bool = False
    read_control: bool = True
    """Whether this monitor reads the control topic (the restart that did not, for the
    deterministic key's sake)."""
    control_read: int = 0

    def _maybe_fail(self, call: str) -> None:
        if call in self.fail:
            self.fail.discard(call)
            raise ConnectionError(f"{call}: broker unavailable")

    async def store_report(self, judged: JudgedWindow) -> ObjectRef:
        self._maybe_fail("store_report")
        key = f"reports/{judged.key.model}/{judged.report_id}.html"
        self.outside.objects[key] = judged.decision.explanation
        return ObjectRef(bucket="b", key=key, etag="e")

    async def send_report(self, report: DriftReport) -> None:
        self._maybe_fail("send_report")
        self.outside.drift.append(report)

    async def send_control(self, event: ControlEvent) -> None:
        self._maybe_fail("send_control")
        self.outside.control.append(event)
        if self.kill_after_control:
            raise Killed

    async def refresh_control(self) -> None:
        if not self.read_control:
            return
        for event in self.outside.control[self.control_read :]:
            self.routing.apply(_route(event))
        self.control_read = len(self.outside.control)


def _route(event: ControlEvent) -> RouteDecision:
    """What a follower of the control topic folds (keys included)."""
    return RouteDecision(
        model=event.model,
        action=RouteAction(event.action.value),
        version=event.to_version,
        issued_at_ms=int(event.issued_at.timestamp() * 1000),
        manual=not (event.issued_by or "").startswith("monitor"),
        idempotency_key=event.idempotency_key,
    )


def _summarise(key: WindowKey, state: Any) -> WindowSummary:
    breaches = (SCORE_DRIFT,) if state["bad"] else ()
    return WindowSummary(
        key.model,
        key.version,
        key.start_ms,
        key.start_ms + WINDOW_MS,
        int(state["count"]),
        {"psi:score": 2.4 if state["bad"] else 0.01},
        breaches=breaches,
    )


@dataclass
class Monitor:
    """One monitor process: tables restored from ``durable``, a routing table read from the
    control topic, the closer."""

    outside: Outside
    clock: FakeClock
    durable: dict[str, dict[str, Any]] = field(default_factory=dict)
    kill_after_control: bool = False
    read_control: bool = True

    def __post_init__(self) -> None:
        self.tables = {
            name: ChangelogTable(self.durable.get(name))
            for name in ("windows", "states", "closed", "history")
        }
        self.routing = RoutingTable({MODEL: "1"})
        self.sink = Sink(
            self.outside,
            self.routing,
            kill_after_control=self.kill_after_control,
            read_control=self.read_control,
        )
        asyncio.run(self.sink.refresh_control())  # read to the end before judging
        self.flushes = 0

        async def flush() -> None:
            self.flushes += 1
            for table in self.tables.values():
                table.flush()

        self.closer = WindowCloser(
            CloserSettings(
                window_ms=WINDOW_MS,
                grace_ms=GRACE_MS,
                min_window_count=100,
                thresholds={"psi": 0.2},
                issuer="monitor:test",
            ),
            windows=self.tables["windows"],
            states=self.tables["states"],
            closed=self.tables["closed"],
            history=self.tables["history"],
            policy=RollbackPolicy(PolicySettings(consecutive_windows=2, recovery_windows=2)),
            routing=self.routing,
            summarise=_summarise,
            sink=self.sink,
            flush=flush,
            clock=self.clock,
        )

    def fold(self, index: int, version: str, *, bad: bool, count: int = 500) -> str:
        key = WindowKey(T0_MS + index * WINDOW_MS, MODEL, version).encode()
        self.tables["windows"][key] = {"count": count, "bad": bad}
        return key

    def close_due(self) -> int:
        return asyncio.run(self.closer.close_due())

    def durable_tables(self) -> dict[str, dict[str, Any]]:
        return {name: table.durable for name, table in self.tables.items()}

    def live_tables(self) -> dict[str, dict[str, Any]]:
        return {name: table.live for name, table in self.tables.items()}


def _at_window(clock: FakeClock, index: int) -> None:
    """Move the clock past window ``index``'s end plus grace."""
    clock.now = (T0_MS + (index + 1) * WINDOW_MS + GRACE_MS) / 1000


def _healthy_v1_then_bad_v2(monitor: Monitor) -> None:
    """Three clean windows of v1, then v2 is promoted and breaches once."""
    for index in range(3):
        monitor.fold(index, "1", bad=False)
        _at_window(monitor.clock, index)
        assert monitor.close_due() == 1
    monitor.outside.control.append(
        ControlEvent(
            event_id=uuid.uuid4(),
            model=MODEL,
            action=ControlAction.PROMOTE,
            to_version="2",
            reason="operator promotes v2",
            issued_at=datetime.fromtimestamp((T0_MS + 3 * WINDOW_MS) / 1000, tz=UTC),
            issued_by="cli:test",
        )
    )
    asyncio.run(monitor.sink.refresh_control())
    assert monitor.routing.version_for(MODEL) == "2"
    monitor.fold(3, "2", bad=True)
    _at_window(monitor.clock, 3)
    assert monitor.close_due() == 1


def _rollbacks(outside: Outside) -> list[ControlEvent]:
    return [e for e in outside.control if e.action is ControlAction.ROLLBACK]


# ---------------------------------------------------------------------------------- window keys


@pytest.mark.parametrize("version", ODD_VERSIONS)
def test_window_keys_round_trip_whatever_the_characters(version: str) -> None:
    key = WindowKey(T0_MS, f"model|{version}", version)
    assert WindowKey.decode(key.encode()) == key
    assert json.loads(version_key(key.model, version)) == [key.model, version]


def test_names_that_join_alike_get_different_keys() -> None:
    left, right = WindowKey(0, "a|b", "c"), WindowKey(0, "a", "b|c")
    assert left.encode() != right.encode()
    assert version_key("a|b", "c") != version_key("a", "b|c")
    assert report_id_for(left) != report_id_for(right)


def test_keys_of_earlier_monitors_are_read_and_garbage_is_refused() -> None:
    assert WindowKey.decode(f"{MODEL}|2|{T0_MS}") == WindowKey(T0_MS, MODEL, "2")
    for bad in ("m|a|b|123", "m|1|x", "[1, 2]", '["m", "1", "3"]', "[true]", '["m", "1", true]'):
        with pytest.raises(ValueError, match="not a window key"):
            WindowKey.decode(bad)


def test_windows_of_odd_versions_close_and_report_the_exact_version() -> None:
    clock = FakeClock()
    monitor = Monitor(Outside(), clock)
    for version in ODD_VERSIONS:
        monitor.fold(0, version, bad=False)
    monitor.tables["windows"]["an|old|unparseable|key"] = {"count": 1, "bad": False}
    _at_window(clock, 0)
    assert monitor.close_due() == len(ODD_VERSIONS)
    assert not monitor.tables["windows"]  # the garbage key is dropped, not blocking the timer
    assert sorted(r.model_version for r in monitor.outside.drift) == sorted(ODD_VERSIONS)
    # Each version's "already judged" mark is its own: a late record of `a|b` is late, a record
    # of `a` (which `a|b` used to share a prefix with) is not.
    assert monitor.closer.is_late(MODEL, "a|b", T0_MS + 10)
    assert not monitor.closer.is_late(MODEL, "a", T0_MS + 10)


# ------------------------------------------------------------------ decision before forgetting


@pytest.mark.parametrize("failing", ["send_report", "store_report"])
def test_a_failed_write_keeps_the_window_and_it_is_judged_again(failing: str) -> None:
    clock = FakeClock()
    monitor = Monitor(Outside(), clock)
    _healthy_v1_then_bad_v2(monitor)
    key = monitor.fold(4, "2", bad=True)
    _at_window(clock, 4)
    monitor.sink.fail.add(failing)
    assert monitor.close_due() == 0
    assert key in monitor.tables["windows"]  # the window is still there ...
    assert [r.model_version for r in monitor.outside.drift].count("2") == 1
    assert not _rollbacks(monitor.outside)

    clock.advance(0.5)
    assert monitor.close_due() == 1  # ... and is judged again
    assert key not in monitor.tables["windows"]
    report = monitor.outside.drift[-1]
    assert (report.decision, report.consecutive_breaches) == (DriftDecision.ROLLBACK, 2)
    [rollback] = _rollbacks(monitor.outside)
    assert (rollback.from_version, rollback.to_version) == ("2", "1")
    assert rollback.report_id == report.report_id == report_id_for(WindowKey.decode(key))


def test_a_failed_rollback_send_keeps_the_window_and_the_retry_sends_it_once() -> None:
    clock = FakeClock()
    monitor = Monitor(Outside(), clock)
    _healthy_v1_then_bad_v2(monitor)
    key = monitor.fold(4, "2", bad=True)
    monitor.fold(5, "1", bad=False)  # a later window waits behind the failed one
    _at_window(clock, 5)
    monitor.sink.fail.add("send_control")
    assert monitor.close_due() == 0
    assert key in monitor.tables["windows"]
    assert len(monitor.tables["windows"]) == 2
    assert not _rollbacks(monitor.outside)

    assert monitor.close_due() == 2
    assert len(_rollbacks(monitor.outside)) == 1
    assert monitor.routing.version_for(MODEL) == "1"
    # The window was judged again, not counted again: the same decision, reported twice.
    reports = [r for r in monitor.outside.drift if r.model_version == "2"]
    assert [r.consecutive_breaches for r in reports] == [1, 2, 2]
    assert reports[1].report_id == reports[2].report_id


def test_table_writes_are_flushed_before_anything_is_written_outside() -> None:
    clock = FakeClock()
    monitor = Monitor(Outside(), clock)
    _healthy_v1_then_bad_v2(monitor)
    monitor.fold(4, "2", bad=True)
    _at_window(clock, 4)
    monitor.sink.kill_after_control = True
    with pytest.raises(Killed):
        monitor.close_due()
    durable = monitor.durable_tables()
    # The judgement (the policy's state, with the decision) was durable before the rollback was
    # sent; the window was not forgotten yet.
    judged = durable["states"][MODEL]["versions"]["2"]
    assert judged["judged_start_ms"] == T0_MS + 4 * WINDOW_MS
    assert judged["judged"]["decision"] == "rollback"
    assert WindowKey(T0_MS + 4 * WINDOW_MS, MODEL, "2").encode() in durable["windows"]


# ------------------------------------------------------------------ killed after a rollback


@pytest.mark.parametrize("restored", ["durable", "everything"])
def test_a_monitor_killed_after_emitting_a_rollback_rolls_back_once(restored: str) -> None:
    clock, outside = FakeClock(), Outside()
    first = Monitor(outside, clock, kill_after_control=True)
    _healthy_v1_then_bad_v2(first)
    key = first.fold(4, "2", bad=True)
    _at_window(clock, 4)
    with pytest.raises(Killed):  # SIGKILL right after the ControlEvent is acknowledged
        first.close_due()
    assert len(_rollbacks(outside)) == 1

    tables = first.durable_tables() if restored == "durable" else first.live_tables()
    second = Monitor(outside, clock, durable=tables)
    assert key in second.tables["windows"]
    assert second.close_due() == 1  # judged again ...
    assert key not in second.tables["windows"]
    assert len(_rollbacks(outside)) == 1  # ... and not rolled back again
    again = [r for r in outside.drift if r.model_version == "2" and r.consecutive_breaches == 2]
    assert len(again) == 2
    assert again[0].report_id == again[1].report_id
    assert again[1].decision is DriftDecision.ROLLBACK  # the same decision, from the state

    # Later windows: v1 serves and stays healthy; v2's leftovers never make a second rollback.
    second.fold(5, "1", bad=False)
    second.fold(5, "2", bad=True)
    second.fold(6, "1", bad=False)
    _at_window(clock, 6)
    assert second.close_due() == 3
    assert len(_rollbacks(outside)) == 1
    assert second.routing.version_for(MODEL) == "1"


def test_a_restart_that_lost_the_judgement_still_rolls_back_once() -> None:
    """The worst case the tables allow: the kill came before the flush took (here: tables from
    before the window was judged). The window is judged afresh; the monitor has read the
    rollback on the control topic, so v2 is no longer serving and it only alerts."""
    clock, outside = FakeClock(), Outside()
    first = Monitor(outside, clock, kill_after_control=True)
    _healthy_v1_then_bad_v2(first)
    key = first.fold(4, "2", bad=True)
    for table in first.tables.values():
        table.flush()
    before = first.durable_tables()
    _at_window(clock, 4)
    with pytest.raises(Killed):
        first.close_due()

    second = Monitor(outside, clock, durable=before)
    assert second.close_due() == 1
    assert key not in second.tables["windows"]
    assert len(_rollbacks(outside)) == 1
    assert outside.drift[-1].decision is DriftDecision.ALERT


def test_the_deterministic_key_makes_a_repeated_rollback_harmless_to_followers() -> None:
    """A restarted monitor that could not see the control topic would send the rollback again:
    the same idempotency key and event id, so a worker applies it once, even with an operator's
    decision in between."""
    clock, outside = FakeClock(), Outside()
    first = Monitor(outside, clock, kill_after_control=True)
    _healthy_v1_then_bad_v2(first)
    first.fold(4, "2", bad=True)
    _at_window(clock, 4)
    with pytest.raises(Killed):
        first.close_due()
    second = Monitor(outside, clock, durable=first.durable_tables(), read_control=False)
    clock.advance(5)
    assert second.close_due() == 1
    one, two = _rollbacks(outside)
    assert one.idempotency_key == two.idempotency_key is not None
    assert one.event_id == two.event_id
    assert one.issued_at < two.issued_at

    worker = RoutingTable({MODEL: "1"})
    worker.apply(_route_promote("2", one.issued_at.timestamp() * 1000 - 1))
    assert worker.apply(_route(one))
    assert worker.version_for(MODEL) == "1"
    operator = _route_promote("3", one.issued_at.timestamp() * 1000 + 1)
    assert worker.apply(operator)
    assert not worker.apply(_route(two))  # the repeat changes nothing
    assert worker.version_for(MODEL) == "3"


def _route_promote(version: str, at_ms: float) -> RouteDecision:
    return RouteDecision(
        model=MODEL,
        action=RouteAction.PROMOTE,
        version=version,
        issued_at_ms=int(at_ms),
        manual=True,
    )


def test_an_older_window_of_a_version_judged_past_is_forgotten_without_a_second_write() -> None:
    clock = FakeClock()
    monitor = Monitor(Outside(), clock)
    monitor.fold(0, "1", bad=False)
    monitor.fold(1, "1", bad=False)
    _at_window(clock, 1)
    assert monitor.close_due() == 2
    assert len(monitor.outside.drift) == 2
    # A restore that brought window 0 back (its deletion was lost, window 1's judgement was not).
    monitor.fold(0, "1", bad=False)
    assert monitor.close_due() == 1
    assert not monitor.tables["windows"]
    assert len(monitor.outside.drift) == 2
