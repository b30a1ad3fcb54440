"""The duplicate memory: both bounds hold whatever is added, oldest forgotten first."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from connectors.common.dedupe import DedupeMetrics, RecentKeys
from tests.unit.fakes import FakeClock


def _memory(clock: FakeClock, **overrides: object) -> RecentKeys:
    options: dict[str, object] = {"max_keys": 3, "max_age_s": 60.0, "clock": clock}
    options.update(overrides)
    return RecentKeys(**options)  # type: ignore[arg-type]


def test_a_key_is_new_once_and_then_a_duplicate() -> None:
    memory = _memory(FakeClock())
    assert memory.add("evt-1") is True
    assert memory.add("evt-1") is False
    assert "evt-1" in memory
    assert "evt-2" not in memory
    assert len(memory) == 1
    assert memory.evicted == 0


def test_the_count_bound_forgets_the_oldest_first() -> None:
    memory = _memory(FakeClock())
    for key in ("a", "b", "c", "d"):
        assert memory.add(key) is True
    assert len(memory) == 3
    assert memory.evicted == 1
    assert "a" not in memory
    assert all(key in memory for key in ("b", "c", "d"))


def test_a_repeated_key_keeps_its_first_seen_place() -> None:
    memory = _memory(FakeClock())
    for key in ("a", "b", "c"):
        memory.add(key)
    assert memory.add("a") is False  # not moved to the young end
    memory.add("d")
    assert "a" not in memory
    assert "b" in memory


def test_keys_age_out_at_max_age_and_not_before() -> None:
    clock = FakeClock()
    memory = _memory(clock, max_keys=100)
    memory.add("old")
    clock.advance(30)
    memory.add("young")
    clock.advance(29.999)
    assert "old" in memory
    clock.advance(0.001)
    assert "old" not in memory
    assert "young" in memory
    assert len(memory) == 1
    assert memory.evicted == 1
    clock.advance(30)
    assert len(memory) == 0
    assert memory.evicted == 2


def test_a_key_forgotten_for_either_bound_is_new_again() -> None:
    clock = FakeClock()
    memory = _memory(clock, max_keys=2)
    memory.add("a")
    memory.add("b")
    memory.add("c")  # "a" forgotten: full
    assert memory.add("a") is True
    clock.advance(60)  # all aged out
    assert memory.add("b") is True
    assert len(memory) == 1
    assert memory.evicted == 4


def test_a_discarded_key_is_new_again_and_not_counted_as_evicted() -> None:
    memory = _memory(FakeClock())
    memory.add("a")
    assert memory.discard("a") is True
    assert memory.discard("a") is False
    assert memory.add("a") is True
    assert memory.evicted == 0


def test_a_million_adds_stay_within_the_count_bound() -> None:
    clock = FakeClock()
    memory = _memory(clock, max_keys=1000, max_age_s=3600.0)
    for i in range(1_000_000):
        memory.add(f"event-{i}")
        clock.advance(0.000_001)
    assert len(memory) == 1000
    assert memory.evicted == 999_000
    assert "event-998999" not in memory
    assert "event-999000" in memory


def test_a_million_adds_stay_within_the_age_bound() -> None:
    clock = FakeClock()
    memory = _memory(clock, max_keys=2_000_000, max_age_s=10.0)
    for i in range(1_000_000):
        memory.add(f"event-{i}")
        clock.advance(0.001)  # 1,000 keys a second: 10,000 younger than 10 s
    assert len(memory) == 10_000
    assert memory.evicted == 990_000


def test_hostile_keys_are_keys_like_any_other() -> None:
    memory = _memory(FakeClock(), max_keys=10)
    huge = "x" * 10_000_000
    hostile = [huge, huge + "y", "", "Zürich/Ω/😀", "\ud800", "a\x00b", "a"]
    for key in hostile:
        assert memory.add(key) is True, key[:20]
    for key in hostile:
        assert key in memory
        assert memory.add(key) is False
    assert "x" * 9_999_999 not in memory
    assert "a\x00" not in memory
    assert b"a" not in memory
    assert len(memory) == len(hostile)


def test_a_clock_that_steps_back_only_delays_forgetting() -> None:
    clock = FakeClock()
    memory = _memory(clock)
    memory.add("a")
    clock.advance(-100)
    memory.add("b")
    assert len(memory) == 2
    clock.advance(160)  # 60 s after "b": both are old enough now
    assert len(memory) == 0


@pytest.mark.parametrize(
    ("max_keys", "max_age_s"),
    [(0, 1.0), (-1, 1.0), (True, 1.0), (1.5, 1.0), (1, 0.0), (1, -1.0), (1, float("inf"))],
)
def test_bounds_that_bound_nothing_are_refused(max_keys: object, max_age_s: object) -> None:
    with pytest.raises(ValueError, match="must be a positive"):
        RecentKeys(max_keys=max_keys, max_age_s=max_age_s)  # type: ignore[arg-type]


def test_an_age_bound_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(ValueError, match="max_age_s"):
        RecentKeys(max_keys=1, max_age_s=float("nan"))


def test_metrics_report_the_size_and_the_evictions_by_reason() -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    metrics = DedupeMetrics(registry)
    memory = _memory(clock, max_keys=2, name="sap-webhook", metrics=metrics)
    other = _memory(clock, name="salesforce-cdc", metrics=metrics)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    keys = "sluiceway_connector_dedupe_keys"
    evicted = "sluiceway_connector_dedupe_evicted_total"
    assert sample(keys, memory="sap-webhook") == 0
    for key in ("a", "b", "c"):
        memory.add(key)
    other.add("a")
    assert sample(keys, memory="sap-webhook") == 2
    assert sample(keys, memory="salesforce-cdc") == 1
    assert sample(evicted, memory="sap-webhook", reason="count") == 1
    clock.advance(60)
    assert len(memory) == 0
    assert sample(keys, memory="sap-webhook") == 0
    assert sample(evicted, memory="sap-webhook", reason="age") == 2
    assert sample(evicted, memory="salesforce-cdc", reason="age") == 0
    with pytest.raises(ValueError, match="sap-webhook"):
        _memory(clock, name="sap-webhook", metrics=metrics)
