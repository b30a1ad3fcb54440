from __future__ import annotations

from pipeline.resilience import BreakerConfig, BreakerState, CircuitBreaker
from tests.unit.fakes import FakeClock

CONFIG = BreakerConfig(
    window_size=10,
    minimum_calls=4,
    failure_rate_threshold=0.5,
    slow_call_threshold_s=1.0,
    slow_call_rate_threshold=0.75,
    open_wait_s=5.0,
    probe_calls=2,
)


def _breaker(clock: FakeClock, changes: list[tuple[BreakerState, BreakerState]]) -> CircuitBreaker:
    return CircuitBreaker(
        "triton/scaler", CONFIG, clock, on_state_change=lambda _n, a, b: changes.append((a, b))
    )


def test_stays_closed_below_the_minimum_number_of_calls() -> None:
    breaker = _breaker(FakeClock(), [])
    for _ in range(3):
        breaker.record_failure(0.1)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()


def test_opens_on_failure_rate_and_refuses_calls_until_the_wait_ends() -> None:
    clock, changes = FakeClock(), []
    breaker = _breaker(clock, changes)
    breaker.record_success(0.1)
    breaker.record_success(0.1)
    breaker.record_failure(0.1)
    assert breaker.state is BreakerState.CLOSED  # 1 of 3 failed, under the minimum
    breaker.record_failure(0.1)  # 2 of 4 = 50%
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    clock.advance(3.0)
    assert breaker.retry_after() == 2.0
    assert not breaker.allow()
    clock.advance(2.0)
    assert breaker.state is BreakerState.HALF_OPEN
    assert changes == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
    ]


def test_opens_on_slow_call_rate_even_when_calls_succeed() -> None:
    breaker = _breaker(FakeClock(), [])
    for duration in (2.0, 2.0, 2.0, 0.1):
        breaker.record_success(duration)
    assert breaker.state is BreakerState.OPEN


def _open_then_half_open(clock: FakeClock, breaker: CircuitBreaker) -> None:
    for _ in range(4):
        breaker.record_failure(0.1)
    clock.advance(CONFIG.open_wait_s)
    assert breaker.state is BreakerState.HALF_OPEN


def test_half_open_lets_only_the_probe_calls_through_and_closes_when_they_succeed() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, [])
    _open_then_half_open(clock, breaker)
    assert breaker.allow()
    assert breaker.allow()
    assert not breaker.allow()  # only two probes
    breaker.record_success(0.1)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record_success(0.1)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()


def test_half_open_reopens_when_probes_fail() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, [])
    _open_then_half_open(clock, breaker)
    assert breaker.allow()
    assert breaker.allow()
    breaker.record_failure(0.1)
    breaker.record_success(0.1)
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after() == CONFIG.open_wait_s


def test_outcomes_reported_while_open_are_ignored() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, [])
    for _ in range(4):
        breaker.record_failure(0.1)
    breaker.record_success(0.1)  # a call that started before the breaker opened
    assert breaker.state is BreakerState.OPEN
