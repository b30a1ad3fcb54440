"""Dates as OData v2, OData v4 and Salesforce write them."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from connectors.common.dates import parse_datetime, to_epoch_ms, to_iso_utc, to_odata_v2_date

MAY_FIRST = datetime(2024, 5, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "text",
    [
        "/Date(1714521600000)/",
        "/Date(1714521600000+0120)/",  # the offset is informational: the ms are UTC
        "2024-05-01",
        "2024-05-01T00:00:00Z",
        "2024-05-01T02:00:00+02:00",
        "2024-05-01T00:00:00",  # naive: SAP's Edm.DateTime means UTC
        date(2024, 5, 1),
    ],
)
def test_every_form_reads_as_the_same_moment(text: object) -> None:
    assert parse_datetime(text) == MAY_FIRST


@pytest.mark.parametrize("text", ["", "yesterday", "/Date(abc)/", 1714521600000, None])
def test_other_values_are_not_dates(text: object) -> None:
    with pytest.raises(ValueError, match="not a date"):
        parse_datetime(text)


def test_dates_written_back() -> None:
    moment = datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)
    assert to_iso_utc(moment) == "2024-05-01T10:00:00.123456Z"
    assert to_iso_utc(moment.replace(microsecond=123000)) == "2024-05-01T10:00:00.123Z"
    assert to_iso_utc(MAY_FIRST) == "2024-05-01T00:00:00Z"
    assert to_odata_v2_date(MAY_FIRST) == "/Date(1714521600000)/"
    assert to_epoch_ms(datetime(1970, 1, 1)) == 0
