"""The Salesforce connector's pure pieces: the org's limit breaker and how a record's values
reach a mapping (nulls, flags, compound fields)."""

from __future__ import annotations

import pytest

from connectors.common.mapping import parse_mapping
from connectors.salesforce.config import entity_values, input_fields
from connectors.salesforce.limits import OrgLimitBreaker
from schemas.errors import UnservableRecord


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_refusal_opens_the_org_breaker_for_the_floor_doubling_until_a_call_succeeds() -> None:
    clock = _Clock()
    breaker = OrgLimitBreaker(floor_s=5.0, ceiling_s=15.0, clock=clock)
    assert breaker.wait_s() == 0.0
    assert breaker.refused() == 5.0
    clock.now += 5.0
    assert not breaker.is_open
    assert breaker.refused() == 10.0
    clock.now += 10.0
    assert breaker.refused() == 15.0  # capped at the ceiling
    clock.now += 15.0
    breaker.succeeded()
    assert breaker.refused() == 5.0  # the doubling starts over
    assert breaker.stats.refusals == 4
    assert breaker.stats.opened == 2


@pytest.mark.parametrize("floor", [0.0, 0.06, 0.999])
def test_the_floor_is_whole_seconds_never_milliseconds(floor: float) -> None:
    with pytest.raises(ValueError, match="seconds"):
        OrgLimitBreaker(floor_s=floor)


MAPPING = parse_mapping(
    {
        "model": "account_risk",
        "source_system": "salesforce",
        "entity_type": "Account",
        "entity_id": "{Id}",
        "features": {
            "revenue": {"path": "AnnualRevenue", "type": "float"},
            "revenue_missing": {"path": "AnnualRevenue__IsNull", "type": "float"},
            "employees": {"path": "NumberOfEmployees", "type": "float"},
            "in_lyon": {
                "path": "BillingAddress.City",
                "type": "float",
                "transform": {"map": {"Lyon": 1}, "map_default": 0},
            },
        },
        "source": {"topic": "/data/ChangeEvents"},
    }
)


def test_null_flags_read_the_field_they_flag() -> None:
    assert input_fields(MAPPING) == ("AnnualRevenue", "NumberOfEmployees", "BillingAddress.City")


def test_a_null_field_takes_its_configured_value_and_its_flag_says_it_was_null() -> None:
    fields = input_fields(MAPPING)
    values = {"AnnualRevenue": None, "NumberOfEmployees": None, "BillingAddress.City": "Lyon"}
    entity = entity_values(values, fields, {"AnnualRevenue": 0.0, "NumberOfEmployees": -1})
    assert MAPPING.features({**entity, "Id": "001A"}) == {
        "revenue": 0.0,
        "revenue_missing": 1.0,
        "employees": -1.0,
        "in_lyon": 1.0,
    }


def test_a_null_without_a_configured_value_or_default_is_unmappable_not_defaulted() -> None:
    fields = input_fields(MAPPING)
    values = {"AnnualRevenue": None, "NumberOfEmployees": 12, "BillingAddress.City": None}
    entity = entity_values(values, fields, {})
    with pytest.raises(UnservableRecord, match="AnnualRevenue"):
        MAPPING.features({**entity, "Id": "001A"})
