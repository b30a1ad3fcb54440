from __future__ import annotations

import pytest

from pipeline.deadlines import (
    backend_timeout_s,
    batch_priority,
    triton_priority_level,
    triton_timeout_us,
)


def test_the_time_left_is_the_timeout_between_floor_and_ceiling() -> None:
    assert backend_timeout_s(0.2, floor_s=0.05, ceiling_s=10.0) == 0.2
    assert backend_timeout_s(0.01, floor_s=0.05, ceiling_s=10.0) == 0.05
    assert backend_timeout_s(-3.0, floor_s=0.05, ceiling_s=10.0) == 0.05
    assert backend_timeout_s(86_400.0, floor_s=0.05, ceiling_s=10.0) == 10.0


def test_no_deadline_or_nonsense_time_left_gets_the_ceiling() -> None:
    assert backend_timeout_s(None, floor_s=0.05, ceiling_s=10.0) == 10.0
    assert backend_timeout_s(float("nan"), floor_s=0.05, ceiling_s=10.0) == 10.0
    assert backend_timeout_s(float("inf"), floor_s=0.05, ceiling_s=10.0) == 10.0


def test_a_floor_above_the_ceiling_yields_the_ceiling() -> None:
    assert backend_timeout_s(0.0, floor_s=5.0, ceiling_s=1.0) == 1.0


@pytest.mark.parametrize(("floor_s", "ceiling_s"), [(0.05, 0.0), (-1.0, 10.0), (0.05, -1.0)])
def test_impossible_bounds_are_refused(floor_s: float, ceiling_s: float) -> None:
    with pytest.raises(ValueError, match="ceiling_s"):
        backend_timeout_s(1.0, floor_s=floor_s, ceiling_s=ceiling_s)


def test_a_batch_is_sent_with_its_most_urgent_priority() -> None:
    assert batch_priority([0, 9, None, 3]) == 9
    assert batch_priority([None, None]) is None
    assert batch_priority([]) is None


def test_priorities_spread_over_tritons_levels_with_level_one_first() -> None:
    assert [triton_priority_level(p, 2) for p in range(10)] == [2] * 5 + [1] * 5
    assert [triton_priority_level(p, 10) for p in range(10)] == list(range(10, 0, -1))
    assert triton_priority_level(9, 3) == 1
    assert triton_priority_level(0, 3) == 3


def test_models_without_levels_and_requests_without_priority_get_the_default() -> None:
    assert triton_priority_level(9, 0) == 0
    assert triton_priority_level(None, 4) == 0


def test_out_of_range_priorities_are_clamped_to_a_real_level() -> None:
    assert triton_priority_level(42, 4) == 1
    assert triton_priority_level(-7, 4) == 4


def test_tritons_timeout_is_whole_microseconds_and_never_zero() -> None:
    assert triton_timeout_us(0.2) == 200_000
    assert triton_timeout_us(0.0) == 1  # 0 would mean "no timeout"
