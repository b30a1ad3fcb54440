"""The connectors' retry budgets are settings: the old defaults, validated, from the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from connectors.common.retries import RetryBudget
from connectors.salesforce.config import SalesforceRetries
from connectors.sap.systems import SapRetries
from pipeline.resilience.retry import RetryPolicy


def test_the_defaults_are_the_budgets_the_connectors_always_had() -> None:
    salesforce, sap = SalesforceRetries(), SapRetries()
    assert salesforce.resubscribe.policy() == RetryPolicy(
        max_attempts=10, base_delay_s=0.5, max_delay_s=30.0, max_elapsed_s=600.0
    )
    assert salesforce.rest.policy() == RetryPolicy(
        max_attempts=8, base_delay_s=0.2, max_delay_s=10.0, max_elapsed_s=120.0
    )
    assert salesforce.writeback.max_attempts == 1_000_000
    assert sap.odata.policy() == RetryPolicy(
        max_attempts=6, base_delay_s=0.2, max_delay_s=5.0, max_elapsed_s=60.0
    )
    # The SAP writeback's waits double from 1 s to 30 s, as before.
    assert [sap.writeback.policy().backoff_cap(n) for n in (1, 2, 6, 7)] == [1, 2, 30, 30]


def test_one_variable_changes_one_field_and_keeps_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLUICEWAY_SAP_RETRIES_ODATA__MAX_ATTEMPTS", "3")
    monkeypatch.setenv("SLUICEWAY_SALESFORCE_RETRIES_REST__MAX_ELAPSED_S", "5")
    assert SapRetries().odata == RetryBudget(
        max_attempts=3, base_delay_s=0.2, max_delay_s=5.0, max_elapsed_s=60.0
    )
    assert SalesforceRetries().rest.max_elapsed_s == 5.0
    assert SalesforceRetries().rest.max_attempts == 8


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SLUICEWAY_SAP_RETRIES_ODATA__MAX_ATTEMPTS", "0"),
        ("SLUICEWAY_SAP_RETRIES_ODATA__MAX_DELAY_S", "0.1"),  # below the base delay
        ("SLUICEWAY_SAP_RETRIES_WRITEBACK__BASE_DELAY_S", "-1"),
        ("SLUICEWAY_SAP_RETRIES_ODATA__MAX_ELAPSED_S", "soon"),
        ("SLUICEWAY_SAP_RETRIES_ODATA__JITTER", "none"),
    ],
)
def test_a_budget_that_makes_no_sense_is_refused_when_it_loads(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError):
        SapRetries()
