"""The Salesforce connector's errors, all under :class:`SalesforceError`."""

from __future__ import annotations

from connectors.common.exceptions import ConnectorError


class SalesforceError(ConnectorError):
    """Base class of every error the Salesforce connector raises."""


class ConfigurationError(SalesforceError):
    """A required setting or environment variable is missing or invalid."""


class AuthenticationError(SalesforceError):
    """The OAuth token endpoint refused the credentials (never retried: a person must act)."""


class PubSubError(SalesforceError):
    """A Pub/Sub API call failed; ``code`` is the gRPC status name, ``error_code`` the
    ``error-code`` trailer Salesforce adds (e.g. ``sfdc.platform.eventbus...``).

    ``transient``: the stream broke for a reason that goes away (UNAVAILABLE, a reset), so the
    connector resubscribes from the last checkpointed replay id."""

    def __init__(
        self, message: str, *, code: str, error_code: str | None = None, transient: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.error_code = error_code
        self.transient = transient


class ReplayIdRejectedError(PubSubError):
    """The stored replay id is expired or corrupt. An operator must decide where to resume;
    the connector stops and alerts, it never switches to LATEST on its own (that would skip
    every event since the checkpoint without a trace)."""


class UndecodableEventError(SalesforceError):
    """An event payload did not decode with its schema."""


class RestError(SalesforceError):
    """A REST call failed; ``status`` and ``error_code`` are Salesforce's answer.

    ``transient``: 503s, 5xx and ``UNABLE_TO_LOCK_ROW`` that outlasted the retry budget (the
    writeback reads its batch again later)."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        error_code: str | None = None,
        fields: tuple[str, ...] = (),
        transient: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.fields = fields
        """The fields Salesforce's error names (``[{"errorCode", "message", "fields"}]``)."""
        if transient is not None:
            self.transient = transient


class RateLimitedError(RestError):
    """``403 REQUEST_LIMIT_EXCEEDED``: the org's API allowance is spent. The org's breaker is
    open; every call waits for it to close (at least the configured floor). A type of its
    own because the writeback waits for the breaker rather than its backoff."""

    transient = True


class PermanentRestError(RestError):
    """A request Salesforce will refuse again (bad field, no access, deleted record)."""
