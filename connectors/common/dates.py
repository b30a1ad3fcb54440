"""Reading the date formats source systems send: OData v2 ``/Date(ms)/`` and ISO 8601.

OData v2 JSON (SAP Gateway) writes ``Edm.DateTime`` as ``/Date(1714557600000)/`` and
``Edm.DateTimeOffset`` as ``/Date(1714557600000+0120)/`` (the offset in minutes is
informational: the milliseconds are UTC). OData v4 and Salesforce write ISO 8601.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

_ODATA_V2_DATE = re.compile(r"^/Date\((-?\d+)([+-]\d{4})?\)/$")


def parse_datetime(value: object) -> datetime:
    """A timezone-aware UTC datetime from ``/Date(ms)/``, an ISO date or an ISO datetime.

    A naive ISO datetime is taken as UTC (what SAP means by ``Edm.DateTime``). Raises
    ``ValueError`` for anything else.
    """
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if not isinstance(value, str):
        raise ValueError(f"not a date: {value!r}")
    text = value.strip()
    legacy = _ODATA_V2_DATE.match(text)
    if legacy is not None:
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=int(legacy.group(1)))
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a date: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def to_odata_v2_date(moment: datetime) -> str:
    """``/Date(ms)/`` for a moment (UTC milliseconds since the epoch)."""
    return f"/Date({to_epoch_ms(moment)})/"


def to_epoch_ms(moment: datetime) -> int:
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return round(aware.timestamp() * 1000)


def to_iso_utc(moment: datetime) -> str:
    """``2024-05-01T10:00:00.123Z``: ISO 8601 in UTC, with as many fraction digits as the
    moment has (none, milliseconds or microseconds), so a position is never rounded up."""
    aware = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    text = aware.strftime("%Y-%m-%dT%H:%M:%S")
    if aware.microsecond % 1000:
        text += f".{aware.microsecond:06d}"
    elif aware.microsecond:
        text += f".{aware.microsecond // 1000:03d}"
    return text + "Z"
