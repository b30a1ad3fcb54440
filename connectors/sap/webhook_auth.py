"""Who may push events to the SAP connector's webhook: Basic, bearer JWT or an HMAC signature.

Pure logic, no I/O: each verifier looks at the request's headers (and, for HMAC, its raw body)
and the time it is given, and either returns the caller's identity or raises
:class:`AuthFailure`. Fetching a JWKS is the caller's business; :class:`JwksCache` only says
when a fetch is due and keeps what came back.

Everything here treats its input as hostile: headers may be missing, repeated, oversized,
badly encoded or crafted to confuse (``alg: none``, an HMAC token signed with the RSA public
key, a timestamp of ``1e9``). A failure never carries a secret or the presented credential;
its ``reason`` is a short code for logs and counters, never sent to the client.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeGuard

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr

MAX_CREDENTIAL_CHARS = 8192
"""An Authorization or signature header longer than this is refused unread: no parser (base64,
JSON, signature) runs on megabytes a stranger chose. Real tokens are a few KiB at most."""
SIGNATURE_HEADER = "X-Sluiceway-Signature"
TIMESTAMP_HEADER = "X-Sluiceway-Timestamp"
SIGNATURE_PREFIX = "sha256="

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
"""Each ECDSA algorithm with the one curve it is defined on (a P-256 key never checks ES512)."""
ASYMMETRIC_ALGORITHMS = RSA_ALGORITHMS | frozenset(EC_CURVES)
"""The only algorithms a bearer token may name: ``none`` and HS* (whose "secret" would be the
public key anyone can fetch) are refused before any key is looked at."""


class AuthFailure(Exception):
    """The request is not authenticated. ``reason`` (a code) is for logs and counters;
    ``challenge`` is the ``WWW-Authenticate`` value the answer carries."""

    def __init__(self, reason: str, challenge: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.challenge = challenge


class Verifier(Protocol):
    @property
    def scheme(self) -> str:
        """Names the mode in logs and docs (``basic``, ``jwt``, ``hmac``)."""
        ...

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> str:
        """The authenticated caller (a user name, a token subject); raises :class:`AuthFailure`.
        ``now`` is the wall clock in Unix seconds."""
        ...


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by case-insensitive name (aiohttp's multidict already is; a plain dict is not)."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def _credential(headers: Mapping[str, str], name: str, challenge: str) -> str:
    value = header(headers, name)
    if value is None or not value.strip():
        raise AuthFailure("missing_credentials", challenge)
    if len(value) > MAX_CREDENTIAL_CHARS:
        raise AuthFailure("oversized_credentials", challenge)
    return value.strip()


def _authorization(headers: Mapping[str, str], scheme: str, challenge: str) -> str:
    """The credentials after ``<scheme> `` in the Authorization header."""
    value = _credential(headers, "Authorization", challenge)
    given, _, credentials = value.partition(" ")
    if given.lower() != scheme.lower() or not credentials.strip():
        raise AuthFailure("malformed_authorization", challenge)
    return credentials.strip()


def _same(given: bytes, expected: bytes) -> bool:
    return hmac.compare_digest(given, expected)


# ---------------------------------------------------------------------------------- Basic


@dataclass(frozen=True)
class BasicVerifier:
    """``Authorization: Basic base64(username:secret)``; both halves compared in constant time."""

    username: str
    secret: SecretStr
    realm: str = "sluiceway"
    scheme: str = "basic"

    @property
    def challenge(self) -> str:
        return f'Basic realm="{self.realm}", charset="UTF-8"'

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> str:
        encoded = _authorization(headers, "Basic", self.challenge)
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise AuthFailure("malformed_authorization", self.challenge) from None
        username, colon, secret = decoded.partition(":")
        if not colon:
            raise AuthFailure("malformed_authorization", self.challenge)
        # Both compared whatever the first answered: the timing says nothing about which failed.
        right_user = _same(username.encode(), self.username.encode())
        right_secret = _same(secret.encode(), self.secret.get_secret_value().encode())
        if not (right_user and right_secret):
            raise AuthFailure("wrong_credentials", self.challenge)
        return username


# ---------------------------------------------------------------------------------- HMAC


def hmac_signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Sluiceway-Signature`` value: HMAC-SHA256 over ``<timestamp>.<raw body>``.

    The timestamp is signed with the body, so an old delivery cannot be replayed later with
    a fresh timestamp."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


@dataclass(frozen=True)
class HmacVerifier:
    """A signature of the raw body and a Unix timestamp within ``tolerance_s`` of now.

    A delivery replayed within the tolerance passes again; it is harmless, since the event's
    id makes it the same request (the connector answers it as a duplicate)."""

    secret: SecretStr
    tolerance_s: float = 300.0
    scheme: str = "hmac"
    challenge: str = f'HMAC-SHA256 header="{SIGNATURE_HEADER}"'

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> str:
        timestamp = _credential(headers, TIMESTAMP_HEADER, self.challenge)
        signature = _credential(headers, SIGNATURE_HEADER, self.challenge)
        # Whole seconds in ASCII digits only: "1e9", "-5", " 7", "NaN" or 40 digits are not times.
        if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
            raise AuthFailure("malformed_timestamp", self.challenge)
        if abs(now - int(timestamp)) > self.tolerance_s:
            raise AuthFailure("stale_timestamp", self.challenge)
        expected = hmac_signature(self.secret.get_secret_value().encode(), timestamp, body)
        if not _same(signature.lower().encode("utf-8", "replace"), expected.encode()):
            raise AuthFailure("bad_signature", self.challenge)
        return "hmac"


# ---------------------------------------------------------------------------------- JWT


@dataclass(frozen=True)
class SigningKey:
    """One of the issuer's public keys, and the algorithm its JWK pins (if it names one)."""

    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    algorithm: str | None = None

    def accepts(self, algorithm: str) -> bool:
        """Whether a token signed with ``algorithm`` may be checked with this key: the pinned
        algorithm if any, RS*/PS* for an RSA key, only the ES* of its own curve for EC."""
        if self.algorithm is not None and self.algorithm != algorithm:
            return False
        if isinstance(self.public_key, rsa.RSAPublicKey):
            return algorithm in RSA_ALGORITHMS
        return EC_CURVES.get(algorithm) == self.public_key.curve.name


class JwksError(ValueError):
    """A key set that cannot be used (not JSON, no usable signing key)."""


def parse_jwks(document: bytes | str) -> dict[str, SigningKey]:
    """The signing keys of a JWKS by ``kid``: RSA and EC public keys only.

    Symmetric (``oct``) keys, keys for encryption (``use: enc``), keys that name an algorithm
    we refuse and keys that do not parse are left out; a set left empty is a :class:`JwksError`.
    """
    try:
        parsed = json.loads(document)
    except (UnicodeDecodeError, json.JSONDecodeError) as invalid:
        raise JwksError(f"the key set is not JSON: {invalid}") from None
    entries = parsed.get("keys") if isinstance(parsed, dict) else None
    if not isinstance(entries, list):
        raise JwksError('the key set has no "keys" array')
    keys: dict[str, SigningKey] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC"):
            continue
        if entry.get("use", "sig") != "sig":
            continue
        if "alg" in entry and entry["alg"] not in ASYMMETRIC_ALGORITHMS:
            continue
        try:
            public_key = jwt.PyJWK(entry).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            continue
        if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            continue  # a private key published by mistake is not trusted as a verifier either
        declared = entry.get("alg")
        keys[str(entry.get("kid", ""))] = SigningKey(
            public_key, declared if isinstance(declared, str) else None
        )
    if not keys:
        raise JwksError("the key set holds no usable RSA or EC signing key")
    return keys


@dataclass
class JwksCache:
    """The issuer's keys, and when to fetch them again.

    A token naming a ``kid`` we do not hold makes a fetch due (the issuer rotated its keys),
    but no sooner than ``min_refetch_s`` after the last one: a stranger sending random kids
    cannot make us hammer the issuer. The keys are also refetched after ``max_age_s``, so a key
    the issuer withdrew stops being trusted. ``now`` is a monotonic clock.
    """

    min_refetch_s: float = 60.0
    max_age_s: float = 3600.0
    keys: dict[str, SigningKey] = field(default_factory=dict)
    fetched_at: float | None = None

    def fetch_due(self, kid: str | None, now: float) -> bool:
        if self.fetched_at is None:
            return True
        age = now - self.fetched_at
        if age >= self.max_age_s:
            return True
        return kid is not None and kid not in self.keys and age >= self.min_refetch_s

    def fetched(self, document: bytes | str, now: float) -> None:
        """Keep the keys of a fetched set (a broken one raises :class:`JwksError` and keeps
        the old keys; the attempt still counts, so a broken issuer is not asked every time)."""
        self.fetched_at = now
        self.keys = parse_jwks(document)

    def failed(self, now: float) -> None:
        """A fetch that did not answer counts as an attempt too."""
        self.fetched_at = now


def token_kid(headers: Mapping[str, str]) -> str | None:
    """The ``kid`` a request's bearer token names, unverified (only to know whether a key set
    fetch is due); ``None`` when there is none or no readable token."""
    try:
        token = _authorization(headers, "Bearer", "")
        kid = jwt.get_unverified_header(token).get("kid")
    except (AuthFailure, jwt.InvalidTokenError):
        return None
    return kid if isinstance(kid, str) and len(kid) <= 256 else None


def _is_time(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class JwtVerifier:
    """``Authorization: Bearer <JWT>`` signed by one of the issuer's keys (RS*/PS*/ES*),
    with ``iss`` and ``aud`` as configured and ``exp`` (required) / ``nbf`` within ``leeway_s``."""

    issuer: str
    audience: str
    keys: JwksCache
    leeway_s: float = 30.0
    scheme: str = "jwt"

    def _challenge(self, error: str | None = None) -> str:
        # RFC 6750: no error code when no credentials came, invalid_token otherwise.
        if error is None:
            return 'Bearer realm="sluiceway"'
        return f'Bearer realm="sluiceway", error="{error}"'

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> str:
        try:
            token = _authorization(headers, "Bearer", self._challenge())
        except AuthFailure as failure:
            if failure.reason == "missing_credentials":
                raise
            raise AuthFailure(failure.reason, self._challenge("invalid_request")) from None
        refused = self._challenge("invalid_token")
        try:
            token_header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthFailure("malformed_token", refused) from None
        algorithm = token_header.get("alg")
        if algorithm not in ASYMMETRIC_ALGORITHMS:
            raise AuthFailure("refused_algorithm", refused)
        key = self._key(token_header.get("kid"), refused)
        if not key.accepts(str(algorithm)):
            raise AuthFailure("algorithm_key_mismatch", refused)
        try:
            claims = jwt.decode(
                token,
                key.public_key,
                algorithms=[str(algorithm)],
                audience=self.audience,
                issuer=self.issuer,
                options={
                    # Times are checked below against the clock we are given.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "require": ["exp", "iss", "aud"],
                },
            )
        except jwt.InvalidAudienceError:
            raise AuthFailure("wrong_audience", refused) from None
        except jwt.InvalidIssuerError:
            raise AuthFailure("wrong_issuer", refused) from None
        except jwt.InvalidSignatureError:
            raise AuthFailure("bad_signature", refused) from None
        except jwt.MissingRequiredClaimError:
            raise AuthFailure("missing_claim", refused) from None
        except (jwt.InvalidTokenError, ValueError, TypeError):
            raise AuthFailure("invalid_token", refused) from None
        expires, not_before = claims.get("exp"), claims.get("nbf")
        if not _is_time(expires) or (not_before is not None and not _is_time(not_before)):
            raise AuthFailure("invalid_token", refused)
        if now > expires + self.leeway_s:
            raise AuthFailure("expired", refused)
        if not_before is not None and now < not_before - self.leeway_s:
            raise AuthFailure("not_yet_valid", refused)
        subject = claims.get("sub")
        return subject if isinstance(subject, str) else "jwt"

    def _key(self, kid: Any, refused: str) -> SigningKey:
        held = self.keys.keys
        if kid is None:
            # A token without kid is only unambiguous against a set of one key.
            if len(held) == 1:
                return next(iter(held.values()))
            raise AuthFailure("unknown_key", refused)
        key = held.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthFailure("unknown_key", refused)
        return key


# ---------------------------------------------------------------------------------- listening


def is_loopback(host: str) -> bool:
    """Whether ``host`` (as given to ``--listen``) only takes connections from this machine.

    Anything not plainly loopback counts as reachable from outside: ``0.0.0.0``, ``::``, an
    empty host (every interface), any name but ``localhost`` (it may resolve anywhere)."""
    bare = host.strip().removeprefix("[").removesuffix("]")
    if bare.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False
