"""The rollback policy on hand-made windows: counts, hysteresis, cooldown, pins, evidence."""

from __future__ import annotations

import pytest

from pipeline.monitoring.evidence import Breach, WindowSummary
from pipeline.monitoring.policy import ModelState, PolicySettings, RollbackPolicy, rollback_key

WINDOW_MS = 30_000
SCORE_DRIFT = Breach("psi:score", 2.4, 0.2)
INPUT_DRIFT = Breach("psi:amount_eur", 0.9, 0.2)


def _window(index: int, version: str, *breaches: Breach) -> WindowSummary:
    start = 1_700_000_000_000 + index * WINDOW_MS
    return WindowSummary(
        "invoice_risk", version, start, start + WINDOW_MS, 500, {}, breaches=tuple(breaches)
    )


def _policy(**overrides: float) -> RollbackPolicy:
    values = {"consecutive_windows": 2, "recovery_windows": 2, "cooldown_s": 300.0, **overrides}
    return RollbackPolicy(
        PolicySettings(
            consecutive_windows=int(values["consecutive_windows"]),
            recovery_windows=int(values["recovery_windows"]),
            cooldown_s=values["cooldown_s"],
        )
    )


def _healthy_v1(policy: RollbackPolicy, state: ModelState) -> int:
    for index in range(3):
        assert (
            policy.observe(state, _window(index, "1"), serving_version="1", pinned=False).decision
            == "none"
        )
    return 3


def test_a_serving_version_breaching_k_windows_is_rolled_back_to_the_healthy_one() -> None:
    policy, state = _policy(), ModelState()
    index = _healthy_v1(policy, state)
    first = policy.observe(
        state, _window(index, "2", SCORE_DRIFT), serving_version="2", pinned=False
    )
    assert (first.decision, first.severity, first.consecutive_breaches) == ("none", "warning", 1)
    second = policy.observe(
        state, _window(index + 1, "2", SCORE_DRIFT, INPUT_DRIFT), serving_version="2", pinned=False
    )
    assert second.decision == "rollback"
    assert second.rollback_to == "1"
    assert second.evidence == (SCORE_DRIFT, INPUT_DRIFT)
    # The explanation names the evidence: metric, value, threshold, windows, target.
    for text in ("psi:score 2.4 > 0.2", "psi:amount_eur 0.9 > 0.2", "2 consecutive", "to v1"):
        assert text in second.explanation
    # The count starts again: the next breach is not a second rollback.
    third = policy.observe(
        state, _window(index + 2, "2", SCORE_DRIFT), serving_version="1", pinned=False
    )
    assert third.decision == "none"


def test_a_clean_window_resets_the_count() -> None:
    policy, state = _policy(), ModelState()
    index = _healthy_v1(policy, state)
    decisions = [
        policy.observe(state, _window(index + i, "2", *b), serving_version="2", pinned=False)
        for i, b in enumerate([(SCORE_DRIFT,), (), (SCORE_DRIFT,), (), (SCORE_DRIFT,)])
    ]
    assert [d.decision for d in decisions] == ["none"] * 5


def test_input_drift_alone_alerts_but_does_not_roll_back() -> None:
    policy, state = _policy(), ModelState()
    index = _healthy_v1(policy, state)
    policy.observe(state, _window(index, "2", INPUT_DRIFT), serving_version="2", pinned=False)
    decision = policy.observe(
        state, _window(index + 1, "2", INPUT_DRIFT), serving_version="2", pinned=False
    )
    assert decision.decision == "alert"
    assert "Only the inputs drifted" in decision.explanation


def test_no_rollback_without_a_healthy_other_version_or_when_pinned_or_not_serving() -> None:
    policy = _policy()
    alone = ModelState()
    policy.observe(alone, _window(0, "2", SCORE_DRIFT), serving_version="2", pinned=False)
    decision = policy.observe(
        alone, _window(1, "2", SCORE_DRIFT), serving_version="2", pinned=False
    )
    assert (decision.decision, decision.rollback_to) == ("alert", None)
    assert "No other version" in decision.explanation

    pinned = ModelState()
    index = _healthy_v1(policy, pinned)
    policy.observe(pinned, _window(index, "2", SCORE_DRIFT), serving_version="2", pinned=True)
    decision = policy.observe(
        pinned, _window(index + 1, "2", SCORE_DRIFT), serving_version="2", pinned=True
    )
    assert decision.decision == "alert"
    assert "pinned" in decision.explanation

    elsewhere = ModelState()
    index = _healthy_v1(policy, elsewhere)
    policy.observe(elsewhere, _window(index, "2", SCORE_DRIFT), serving_version="1", pinned=False)
    decision = policy.observe(
        elsewhere, _window(index + 1, "2", SCORE_DRIFT), serving_version="1", pinned=False
    )
    assert decision.decision == "alert"


def test_cooldown_holds_back_a_second_automatic_action() -> None:
    policy, state = _policy(cooldown_s=600), ModelState()
    index = _healthy_v1(policy, state)
    for i in range(2):
        last = policy.observe(
            state, _window(index + i, "2", SCORE_DRIFT), serving_version="2", pinned=False
        )
    assert last.decision == "rollback"
    # v3 is promoted, turns out bad too; v1 still healthy, but we rolled back 60 s ago.
    index += 2
    for i in range(2):
        policy.observe(state, _window(index + i, "1"), serving_version="1", pinned=False)
    index += 2
    policy.observe(state, _window(index, "3", SCORE_DRIFT), serving_version="3", pinned=False)
    decision = policy.observe(
        state, _window(index + 1, "3", SCORE_DRIFT), serving_version="3", pinned=False
    )
    assert decision.decision == "alert"
    assert "cooldown" in decision.explanation


def test_hysteresis_an_alerting_version_needs_several_clean_windows_to_be_healthy() -> None:
    policy, state = _policy(recovery_windows=3), ModelState()
    for i in range(2):
        policy.observe(state, _window(i, "1", SCORE_DRIFT), serving_version="1", pinned=False)
    assert state.versions["1"].alerting
    policy.observe(state, _window(2, "1"), serving_version="1", pinned=False)
    policy.observe(state, _window(3, "1"), serving_version="1", pinned=False)
    assert state.versions["1"].alerting
    # v2 now breaches: v1 is not yet healthy again, so there is nothing to roll back to.
    policy.observe(state, _window(4, "2", SCORE_DRIFT), serving_version="2", pinned=False)
    decision = policy.observe(
        state, _window(5, "2", SCORE_DRIFT), serving_version="2", pinned=False
    )
    assert decision.decision == "alert"
    policy.observe(state, _window(6, "1"), serving_version="1", pinned=False)
    assert not state.versions["1"].alerting


def test_state_survives_a_json_round_trip_mid_streak() -> None:
    import json

    policy, state = _policy(), ModelState()
    index = _healthy_v1(policy, state)
    policy.observe(state, _window(index, "2", SCORE_DRIFT), serving_version="2", pinned=False)
    restored = ModelState.from_json(json.loads(json.dumps(state.to_json())))
    decision = policy.observe(
        restored, _window(index + 1, "2", SCORE_DRIFT), serving_version="2", pinned=False
    )
    assert decision.decision == "rollback"


def test_the_same_window_seen_again_gets_the_same_decision_and_is_not_counted_twice() -> None:
    policy, state = _policy(), ModelState()
    index = _healthy_v1(policy, state)
    first = _window(index, "2", SCORE_DRIFT)
    assert policy.observe(state, first, serving_version="2", pinned=False).decision == "none"
    again = policy.observe(state, first, serving_version="2", pinned=False)
    assert (again.decision, again.consecutive_breaches) == ("none", 1)
    second = _window(index + 1, "2", SCORE_DRIFT)
    rollback = policy.observe(state, second, serving_version="2", pinned=False)
    assert rollback.decision == "rollback"
    # Seen again after the state went through its JSON (a restart), with the routing table
    # already rolled back: still the same rollback, with the same key.
    restored = ModelState.from_json(state.to_json())
    replay = policy.observe(restored, second, serving_version="1", pinned=False)
    assert replay == rollback
    assert restored.behind("2", first.start_ms)
    assert not restored.behind("2", second.start_ms)
    with pytest.raises(ValueError, match="older than"):
        policy.observe(restored, first, serving_version="1", pinned=False)


def test_a_rollback_key_names_the_model_the_versions_and_the_breaching_windows() -> None:
    policy, state = _policy(), ModelState()
    index = _healthy_v1(policy, state)
    policy.observe(state, _window(index, "2", SCORE_DRIFT), serving_version="2", pinned=False)
    decision = policy.observe(
        state, _window(index + 1, "2", SCORE_DRIFT), serving_version="2", pinned=False
    )
    starts = [_window(index, "2").start_ms, _window(index + 1, "2").start_ms]
    assert decision.windows == tuple((s, s + WINDOW_MS) for s in starts)
    assert decision.idempotency_key == rollback_key("invoice_risk", "2", "1", starts)
    assert decision.idempotency_key is not None
    assert len(decision.idempotency_key) <= 64
    others = {
        rollback_key("invoice_risk", "2", "1", starts[1:]),
        rollback_key("invoice_risk", "3", "1", starts),
        rollback_key("invoice_risk", "2", "0", starts),
        rollback_key("other", "2", "1", starts),
        rollback_key("invoice_risk|2", "", "1", starts),
    }
    assert decision.idempotency_key not in others
    assert len(others) == 5
