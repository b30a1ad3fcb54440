"""Salesforce REST: sObject and sObject Collections reads and writes, with Salesforce's errors.

What Salesforce answers, and what the client does about it:

- ``403`` with ``REQUEST_LIMIT_EXCEEDED`` is the org's API limit (Salesforce never sends
  429): the org's breaker (:class:`~connectors.salesforce.limits.OrgLimitBreaker`) opens for
  at least its floor in seconds, the call fails with :class:`RateLimitedError`, and every
  later call waits until the breaker closes.
- ``401`` with ``INVALID_SESSION_ID``: the token expired. Authenticate once more and retry
  once; a second 401 is an :class:`AuthenticationError`.
- ``503`` (and other 5xx): retry with backoff.
- Anything else is permanent for the request.
- ``PATCH /composite/sobjects`` with ``allOrNone=false`` answers 200 with one SaveResult per
  record, in request order. A failed record (``ENTITY_IS_DELETED``, ``INVALID_FIELD`` ...) is
  permanent for that record only; ``UNABLE_TO_LOCK_ROW`` is the one record error worth
  retrying.

Every write carries ``Sforce-Call-Options: client=<client id>``, which Salesforce copies into
the ``changeOrigin`` of the change event the write causes: that is how the connector knows
its own writeback when it comes back through Change Data Capture.

Batching and classification are pure functions; :class:`SalesforceRest` is the I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any
from urllib.parse import quote

import httpx2

from connectors.salesforce.auth import Authenticator
from connectors.salesforce.config import SalesforceRetries
from connectors.salesforce.exceptions import (
    AuthenticationError,
    PermanentRestError,
    RateLimitedError,
    RestError,
)
from connectors.salesforce.limits import OrgLimitBreaker
from pipeline.resilience.retry import RetryPolicy

DEFAULT_API_VERSION = "62.0"
COLLECTION_LIMIT = 200
"""sObject Collections take at most 200 records per request."""
RETRIEVE_LIMIT = 2000
"""sObject Collections GET takes at most 2,000 ids (and a URL of at most 16,384 bytes)."""
TRANSIENT_RECORD_ERRORS = frozenset({"UNABLE_TO_LOCK_ROW"})


class Verdict(Enum):
    OK = "ok"
    RATE_LIMITED = "rate_limited"
    SESSION_EXPIRED = "session_expired"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


def error_code_of(body: Any) -> str | None:
    """``errorCode`` of Salesforce's error body ``[{"message": ..., "errorCode": ...}]``."""
    if isinstance(body, list) and body and isinstance(body[0], Mapping):
        code = body[0].get("errorCode")
        return str(code) if code is not None else None
    if isinstance(body, Mapping):
        code = body.get("errorCode")
        return str(code) if code is not None else None
    return None


def classify(status: int, error_code: str | None) -> Verdict:
    if 200 <= status < 300:
        return Verdict.OK
    if status == 403 and error_code == "REQUEST_LIMIT_EXCEEDED":
        return Verdict.RATE_LIMITED
    if status == 401:
        return Verdict.SESSION_EXPIRED
    if status in (429, 500, 502, 503, 504):
        return Verdict.TRANSIENT
    return Verdict.PERMANENT


@dataclass(frozen=True)
class RecordUpdate:
    sobject: str
    record_id: str
    fields: Mapping[str, Any]

    def collection_item(self) -> dict[str, Any]:
        return {"attributes": {"type": self.sobject}, "id": self.record_id, **self.fields}


@dataclass(frozen=True)
class RecordOutcome:
    update: RecordUpdate
    ok: bool
    error_code: str | None = None
    message: str | None = None
    fields: tuple[str, ...] = ()
    """The fields Salesforce names in the error (``errors[0].fields``)."""

    @property
    def transient(self) -> bool:
        return not self.ok and self.error_code in TRANSIENT_RECORD_ERRORS


def chunks(
    updates: Sequence[RecordUpdate], size: int = COLLECTION_LIMIT
) -> Iterator[list[RecordUpdate]]:
    """Consecutive slices of at most ``size`` records (Salesforce's collection limit)."""
    if not 1 <= size <= COLLECTION_LIMIT:
        raise ValueError(f"size must be in [1, {COLLECTION_LIMIT}], got {size}")
    for start in range(0, len(updates), size):
        yield list(updates[start : start + size])


def save_outcomes(updates: Sequence[RecordUpdate], results: Any) -> list[RecordOutcome]:
    """Pair each update with its SaveResult (same order, as Salesforce documents)."""
    if not isinstance(results, list) or len(results) != len(updates):
        count = len(results) if isinstance(results, list) else "no list of"
        raise RestError(
            f"sObject Collections answered {count} results for {len(updates)} records",
            status=200,
            transient=True,
        )
    outcomes = []
    for update, result in zip(updates, results, strict=True):
        if result.get("success"):
            outcomes.append(RecordOutcome(update, True))
            continue
        errors = result.get("errors") or [{}]
        first = errors[0]
        outcomes.append(
            RecordOutcome(
                update,
                False,
                str(first.get("statusCode") or "UNKNOWN"),
                str(first.get("message") or ""),
                _fields_of(first),
            )
        )
    return outcomes


def _fields_of(error: Any) -> tuple[str, ...]:
    fields = error.get("fields") if isinstance(error, Mapping) else None
    if not isinstance(fields, list):
        return ()
    return tuple(str(name) for name in fields if isinstance(name, str))


def soql_datetime(epoch_ms: int) -> str:
    """A SOQL datetime literal (``2024-05-01T10:00:00Z``: no quotes, UTC)."""
    moment = datetime.fromtimestamp(epoch_ms / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------- I/O edge


class SalesforceRest:
    """REST calls against the session's instance, with Salesforce's retry rules."""

    def __init__(
        self,
        auth: Authenticator,
        http: httpx2.Client,
        *,
        api_version: str = DEFAULT_API_VERSION,
        client_id: str = "sluiceway",
        retry: RetryPolicy | None = None,
        limits: OrgLimitBreaker | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.auth = auth
        self.limits = limits or OrgLimitBreaker(clock=clock)
        self._http = http
        self.api_version = api_version
        self.client_id = client_id
        self.retry = retry or SalesforceRetries().rest.policy()
        self._sleep = sleep
        self._clock = clock

    @property
    def data_path(self) -> str:
        return f"/services/data/v{self.api_version}"

    # ------------------------------------------------------------------ calls

    def update_record(self, update: RecordUpdate) -> None:
        """PATCH one record (204 on success)."""
        path = f"{self.data_path}/sobjects/{quote(update.sobject)}/{quote(update.record_id)}"
        self._send("PATCH", path, json=dict(update.fields))

    def update_records(self, updates: Sequence[RecordUpdate]) -> list[RecordOutcome]:
        """PATCH up to 200 records with ``allOrNone=false``; one outcome per record. Records
        that failed with ``UNABLE_TO_LOCK_ROW`` are retried with backoff; what is left after
        the budget is returned as failed."""
        if len(updates) > COLLECTION_LIMIT:
            raise ValueError(f"at most {COLLECTION_LIMIT} records per request, got {len(updates)}")
        final: dict[int, RecordOutcome] = {}
        waiting = list(enumerate(updates))
        attempts, started = 0, self._clock()
        while waiting:
            attempts += 1
            body = {"allOrNone": False, "records": [u.collection_item() for _, u in waiting]}
            response = self._send("PATCH", f"{self.data_path}/composite/sobjects", json=body)
            outcomes = save_outcomes([u for _, u in waiting], response.json())
            retry_later = []
            for (index, _), outcome in zip(waiting, outcomes, strict=True):
                final[index] = outcome
                if outcome.transient:
                    retry_later.append((index, outcome.update))
            waiting = retry_later
            if waiting:
                delay = self.retry.next_delay(attempts, self._clock() - started)
                if delay is None:
                    break
                self._sleep(delay)
        return [final[index] for index in range(len(updates))]

    def retrieve_records(
        self, sobject: str, record_ids: Sequence[str], fields: Sequence[str]
    ) -> dict[str, dict[str, Any] | None]:
        """Read records by id (``GET /composite/sobjects/<type>``); a record that no longer
        exists maps to ``None``."""
        found: dict[str, dict[str, Any] | None] = {}
        names = ",".join(dict.fromkeys(["Id", *fields]))
        for start in range(0, len(record_ids), RETRIEVE_LIMIT):
            ids = list(record_ids[start : start + RETRIEVE_LIMIT])
            response = self._send(
                "GET",
                f"{self.data_path}/composite/sobjects/{quote(sobject)}",
                params={"ids": ",".join(ids), "fields": names},
            )
            records = response.json()
            for record_id, record in zip(ids, records, strict=True):
                found[record_id] = record if isinstance(record, dict) else None
        return found

    def query(self, soql: str) -> Iterator[dict[str, Any]]:
        """Every record of a SOQL query, following ``nextRecordsUrl``."""
        response = self._send("GET", f"{self.data_path}/query", params={"q": soql})
        while True:
            page = response.json()
            yield from page.get("records", [])
            next_url = page.get("nextRecordsUrl")
            if page.get("done", True) or not next_url:
                return
            response = self._send("GET", str(next_url))

    # ------------------------------------------------------------------ transport

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx2.Response:
        """One call with Salesforce's rules: re-authenticate once on 401, back off on 403
        ``REQUEST_LIMIT_EXCEEDED`` and 5xx, fail at once on anything else."""
        attempts, started, reauthenticated = 0, self._clock(), False
        while True:
            attempts += 1
            hold = self.limits.wait_s()
            if hold > 0:
                self.limits.held(hold)
                self._sleep(hold)
            session = self.auth.session()
            headers = {
                "Authorization": f"Bearer {session.access_token}",
                "Sforce-Call-Options": f"client={self.client_id}",
            }
            try:
                response = self._http.request(
                    method, f"{session.instance_url}{path}", headers=headers, **kwargs
                )
            except httpx2.TransportError as exc:
                status, code, text, body = 0, None, f"{type(exc).__name__}", None
                verdict = Verdict.TRANSIENT
            else:
                status = response.status_code
                body = _json_or_none(response)
                code = error_code_of(body)
                verdict = classify(status, code)
                text = _message_of(body) or response.reason_phrase
                if verdict is Verdict.OK:
                    self.limits.succeeded()
                    return response
            what = f"{method} {path.split('?')[0]}: {status} {code or ''} {text}".strip()
            if verdict is Verdict.SESSION_EXPIRED:
                if reauthenticated:
                    raise AuthenticationError(f"{what} (again after re-authenticating)")
                self.auth.refresh(session)
                reauthenticated = True
                continue
            if verdict is Verdict.RATE_LIMITED:
                hold = self.limits.refused()
                raise RateLimitedError(
                    f"{what} (org breaker open for {hold:.0f}s)", status=status, error_code=code
                )
            if verdict is Verdict.PERMANENT:
                raise PermanentRestError(
                    what, status=status, error_code=code, fields=_error_fields(body)
                )
            delay = self.retry.next_delay(attempts, self._clock() - started)
            if delay is None:
                raise RestError(
                    f"{what} (gave up after {attempts} attempts)",
                    status=status,
                    error_code=code,
                    transient=True,
                )
            self._sleep(delay)


def _json_or_none(response: httpx2.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _error_fields(body: Any) -> tuple[str, ...]:
    if isinstance(body, list) and body:
        return _fields_of(body[0])
    return _fields_of(body)


def _message_of(body: Any) -> str | None:
    if isinstance(body, list) and body and isinstance(body[0], Mapping):
        return str(body[0].get("message") or "") or None
    return None


__all__ = [
    "COLLECTION_LIMIT",
    "RecordOutcome",
    "RecordUpdate",
    "RestError",
    "SalesforceRest",
    "Verdict",
    "chunks",
    "classify",
    "save_outcomes",
]
