from __future__ import annotations

import pytest

from pipeline.resilience import RetryPolicy


def test_backoff_cap_doubles_up_to_the_maximum() -> None:
    policy = RetryPolicy(base_delay_s=0.1, max_delay_s=1.0, max_attempts=10)
    assert [policy.backoff_cap(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_full_jitter_draws_between_zero_and_the_cap() -> None:
    policy = RetryPolicy(base_delay_s=0.1, max_delay_s=1.0)
    assert policy.next_delay(3, elapsed_s=0.0, random=lambda: 0.0) == 0.0
    assert policy.next_delay(3, elapsed_s=0.0, random=lambda: 0.5) == pytest.approx(0.2)
    assert policy.next_delay(3, elapsed_s=0.0, random=lambda: 0.999) == pytest.approx(0.3996)


def test_gives_up_after_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert policy.next_delay(2, 0.0, random=lambda: 0.5) is not None
    assert policy.next_delay(3, 0.0, random=lambda: 0.5) is None


def test_never_waits_past_the_total_budget_or_the_deadline() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=8.0, max_elapsed_s=10.0, max_attempts=9)
    assert policy.next_delay(4, elapsed_s=5.0, random=lambda: 0.5) == 4.0
    assert policy.next_delay(4, elapsed_s=6.5, random=lambda: 0.5) is None
    assert policy.next_delay(4, elapsed_s=0.0, time_left_s=3.9, random=lambda: 0.5) is None
    assert policy.next_delay(4, elapsed_s=0.0, time_left_s=4.1, random=lambda: 0.5) == 4.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"base_delay_s": 0},
        {"base_delay_s": 2, "max_delay_s": 1},
        {"max_elapsed_s": 0},
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must be|need"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_a_retry_after_from_the_server_is_a_floor_but_never_beats_the_deadline() -> None:
    policy = RetryPolicy(base_delay_s=0.1, max_delay_s=1.0)
    assert policy.next_delay(1, 0.0, random=lambda: 0.5, not_before_s=3.0) == 3.0
    assert policy.next_delay(1, 0.0, random=lambda: 0.5, not_before_s=0.01) == pytest.approx(0.05)
    assert policy.next_delay(1, 0.0, time_left_s=2.0, random=lambda: 0.5, not_before_s=3.0) is None
