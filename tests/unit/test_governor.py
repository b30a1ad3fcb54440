"""The bulk governor with a fake clock: pacing only while real-time traffic flows, AIMD."""

from __future__ import annotations

import pytest

from pipeline.batching.governor import BulkGovernor
from pipeline.settings import WorkerSettings
from tests.unit.fakes import FakeClock
from workers.inference.dispatch import REALTIME_ACTIVE_S, Dispatcher


def _governor(clock: FakeClock) -> BulkGovernor:
    return BulkGovernor(clock, target_s=0.04, active_window_s=1.0, resume_interval_s=0.1)


def test_bulk_work_is_unpaced_without_real_time_traffic() -> None:
    clock = FakeClock()
    governor = _governor(clock)
    governor.observe_realtime(1.0)  # even after a breach
    governor.bulk_dispatched()
    assert governor.bulk_wait_s() == 0.0


def test_real_time_arrival_starts_bulk_paced_and_comfort_speeds_it_up() -> None:
    clock = FakeClock()
    governor = _governor(clock)
    governor.realtime_arrived()
    governor.bulk_dispatched()
    assert governor.bulk_wait_s() == pytest.approx(0.1)
    for _ in range(99):
        governor.observe_realtime(0.01)
    assert governor.interval_s == pytest.approx(0.1 * 0.993**99)
    assert governor.interval_s == pytest.approx(0.05, rel=0.01)


def test_a_breach_doubles_the_pause_up_to_the_cap() -> None:
    clock = FakeClock()
    governor = _governor(clock)
    governor.realtime_arrived()
    for _ in range(10):
        governor.observe_realtime(0.2)
    assert governor.interval_s == 1.0
    governor.bulk_dispatched()
    clock.advance(0.4)
    assert governor.bulk_wait_s() == pytest.approx(0.6)
    clock.advance(0.6)
    assert governor.bulk_wait_s() == 0.0


def test_pacing_ends_a_second_after_the_last_real_time_request() -> None:
    clock = FakeClock()
    governor = _governor(clock)
    governor.realtime_arrived()
    governor.bulk_dispatched()
    clock.advance(0.5)
    assert governor.bulk_wait_s() == 0.0  # 0.1 s pause already over
    governor.observe_realtime(0.5)
    governor.bulk_dispatched()
    assert governor.bulk_wait_s() > 0
    clock.advance(1.0)
    assert not governor.realtime_active()
    assert governor.bulk_wait_s() == 0.0


def test_long_comfort_stops_pacing_entirely() -> None:
    clock = FakeClock()
    governor = _governor(clock)
    governor.realtime_arrived()
    for _ in range(2_000):
        governor.observe_realtime(0.01)
    assert governor.interval_s == 0.0


def test_bulk_records_get_the_whole_worker_until_real_time_traffic_returns() -> None:
    clock = FakeClock()
    settings = WorkerSettings(max_in_flight_records=4096, max_in_flight_bulk_records=512)
    dispatcher = Dispatcher(settings, {"scaler": "triton"}, clock)
    assert dispatcher.bulk_record_cap() is None
    dispatcher.governor.realtime_arrived()
    assert dispatcher.bulk_record_cap() == 512  # the instant it arrives
    clock.advance(REALTIME_ACTIVE_S - 0.01)
    assert dispatcher.bulk_record_cap() == 512
    clock.advance(0.02)
    assert dispatcher.bulk_record_cap() is None
