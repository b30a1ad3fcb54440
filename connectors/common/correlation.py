"""Signed correlation ids: a connector writes back only results of requests it published. Pure.

The worker copies a request's ``correlation_id`` into its result, and anybody who can publish
a request chooses that id. Were the id just ``<connector>|<record>``, a stranger could make a
connector write a score computed from the stranger's own inputs into any record. So the
connector signs what it publishes::

    <prefix>|<connector>|<subject>|<request id>|<mac>

``mac`` is HMAC-SHA256 (base64url, unpadded) with the connector secret over everything before
the last ``|``. It binds the connector (a signature is not valid for another connector), the
subject (not for another record) and the request id (not for another request: the result
carries the request id it answers, and the id in the signature must be that one). Verifying
needs only the secret, so a restarted connector still recognises its earlier requests.

Key rotation: the first secret signs, every listed secret verifies. Deploy ``new,old``; once
the results of requests signed with ``old`` are written back, deploy ``new`` alone.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from uuid import UUID

from schemas.errors import UnservableRecord

ENV_VARIABLE = "SLUICEWAY_CONNECTOR_SECRET"
"""Comma-separated secrets of every connector, the signing one first."""
MIN_SECRET_CHARS = 32
"""A secret shorter than this is refused: a guessable secret is a forgeable writeback."""
MAX_CORRELATION_CHARS = 256
"""The ``correlation_id`` field's limit in the event schemas."""
SEPARATOR = "|"
_MAC_BYTES = 32
_MAC_SHAPE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # base64url of 32 bytes, unpadded
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class MissingSecretError(ValueError):
    """No (usable) connector secret in the environment: the connector must not start."""


@dataclass(frozen=True)
class Verified:
    subject: str


@dataclass(frozen=True)
class Rejected:
    """A correlation id this connector cannot vouch for, and why (a stable, loggable code)."""

    reason: str


def secret_env_name(connector: str) -> str:
    """The per-connector variable, which wins over :data:`ENV_VARIABLE` when set."""
    return f"{ENV_VARIABLE}_{re.sub(r'[^A-Za-z0-9]', '_', connector).upper()}"


def secrets_from_env(environ: Mapping[str, str], connector: str) -> tuple[bytes, ...]:
    """The connector's secrets: ``SLUICEWAY_CONNECTOR_SECRET_<NAME>`` or else
    ``SLUICEWAY_CONNECTOR_SECRET``, comma-separated, the signing one first.

    A missing or short secret raises :class:`MissingSecretError`: the check is never silently
    switched off, and a random secret made up at start would leave the results of requests
    published before a restart unverifiable (their scores would never be written back).
    """
    specific = secret_env_name(connector)
    raw = environ.get(specific) or environ.get(ENV_VARIABLE) or ""
    secrets = [part.strip() for part in raw.split(",") if part.strip()]
    if not secrets:
        raise MissingSecretError(
            f"connector {connector!r} needs a secret to sign its requests: set {ENV_VARIABLE} "
            f"(or {specific}) to a random string of at least {MIN_SECRET_CHARS} characters, "
            'e.g. python -c "import secrets; print(secrets.token_urlsafe(32))"; keep it across '
            "restarts (results of earlier requests are verified with it)"
        )
    short = [index for index, secret in enumerate(secrets) if len(secret) < MIN_SECRET_CHARS]
    if short:
        raise MissingSecretError(
            f"connector {connector!r}: secret number {short[0] + 1} in {specific} / {ENV_VARIABLE} "
            f"is shorter than {MIN_SECRET_CHARS} characters"
        )
    return tuple(secret.encode() for secret in secrets)


class CorrelationSigner:
    """Signs and verifies one connector's correlation ids (``prefix`` names the system)."""

    def __init__(self, prefix: str, connector: str, secrets: Sequence[bytes]) -> None:
        if not _NAME.match(prefix) or not _NAME.match(connector):
            raise ValueError(f"prefix {prefix!r} / connector {connector!r}: use [A-Za-z0-9_.:-]")
        if not secrets or any(not secret for secret in secrets):
            raise MissingSecretError(f"connector {connector!r}: no secret to sign with")
        self.prefix = prefix
        self.connector = connector
        self._secrets = tuple(secrets)
        self._head = f"{prefix}{SEPARATOR}{connector}{SEPARATOR}"

    def sign(self, subject: str, request_id: UUID | str) -> str:
        """The correlation id of the request ``request_id`` about ``subject``.

        Raises :class:`UnservableRecord` (``subject_too_long``) when the id would not fit the
        schema's limit: the record is dead-lettered rather than published unsigned."""
        if not subject:
            raise UnservableRecord("invalid_subject", "the record names no subject to write to")
        signed = f"{self._head}{subject}{SEPARATOR}{UUID(str(request_id))}"
        correlation = f"{signed}{SEPARATOR}{_mac(self._secrets[0], signed)}"
        if len(correlation) > MAX_CORRELATION_CHARS:
            raise UnservableRecord(
                "subject_too_long",
                f"the signed correlation id would be {len(correlation)} characters, "
                f"over the limit of {MAX_CORRELATION_CHARS}",
            )
        return correlation

    def verify(self, correlation: str | None, request_id: UUID | str) -> Verified | Rejected:
        """The subject of a result whose correlation id this connector signed for exactly
        this request id; else why not (``not_ours``: another connector's or nobody's, not a
        forgery; the other reasons are)."""
        if not correlation or not correlation.startswith(self._head):
            return Rejected("not_ours")
        signed, separator, mac = correlation.rpartition(SEPARATOR)
        if not separator or not _MAC_SHAPE.match(mac):
            return Rejected("unsigned")
        body, separator, signed_request = signed[len(self._head) :].rpartition(SEPARATOR)
        if not separator or not body:
            return Rejected("malformed")
        if not any(hmac.compare_digest(_mac(secret, signed), mac) for secret in self._secrets):
            return Rejected("bad_signature")
        if not hmac.compare_digest(_utf8(signed_request), _utf8(str(request_id))):
            # Signed by us, but for another request: a real request's id copied onto another.
            return Rejected("other_request")
        return Verified(body)


def _utf8(text: str) -> bytes:
    # surrogatepass: a lone surrogate in hostile text is compared, not a crash.
    return text.encode("utf-8", "surrogatepass")


def _mac(secret: bytes, signed: str) -> str:
    digest = hmac.new(secret, _utf8(signed), hashlib.sha256).digest()
    assert len(digest) == _MAC_BYTES
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


__all__ = [
    "ENV_VARIABLE",
    "MAX_CORRELATION_CHARS",
    "CorrelationSigner",
    "MissingSecretError",
    "Rejected",
    "Verified",
    "secret_env_name",
    "secrets_from_env",
]
