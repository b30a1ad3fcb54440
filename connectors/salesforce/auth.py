"""OAuth 2.0 for Salesforce: the client-credentials flow and the JWT bearer flow.

Both post to ``<login url>/services/oauth2/token`` and get back ``access_token``,
``instance_url`` and ``id`` (``https://login.salesforce.com/id/<org id>/<user id>``, where
the org id is the Pub/Sub API's ``tenantid``). The JWT bearer assertion is signed RS256 with
the connected app's private key (``cryptography``; the claims are ``iss`` = consumer key,
``sub`` = username, ``aud`` = login URL, ``exp`` at most three minutes ahead).

Secrets come only from the environment (:func:`flow_from_env`) and never appear in a repr,
a log line or an error message.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx2
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from connectors.salesforce.exceptions import AuthenticationError, ConfigurationError
from connectors.salesforce.pubsub import PubSubSession

TOKEN_PATH = "/services/oauth2/token"  # noqa: S105 - a URL path, not a secret
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
JWT_LIFETIME_S = 180
"""Salesforce accepts an assertion whose ``exp`` is at most three minutes away."""

ENV_LOGIN_URL = "SALESFORCE_LOGIN_URL"
ENV_CLIENT_ID = "SALESFORCE_CLIENT_ID"
ENV_CLIENT_SECRET = "SALESFORCE_CLIENT_SECRET"  # noqa: S105 - a variable name, not a secret
ENV_USERNAME = "SALESFORCE_USERNAME"
ENV_PRIVATE_KEY_FILE = "SALESFORCE_PRIVATE_KEY_FILE"
ENV_AUDIENCE = "SALESFORCE_JWT_AUDIENCE"


@dataclass(frozen=True)
class ClientCredentials:
    login_url: str
    client_id: str
    client_secret: str = field(repr=False)

    def form(self, now: float) -> dict[str, str]:
        return {
            "grant_type": "client_credentials",
            "client_id": self.client_id,
            "client_secret": self.client_secret,
        }


@dataclass(frozen=True)
class JwtBearer:
    login_url: str
    client_id: str
    username: str
    private_key_pem: bytes = field(repr=False)
    audience: str | None = None
    """Defaults to the login URL (``https://login.salesforce.com`` or ``test.``)."""

    def form(self, now: float) -> dict[str, str]:
        return {
            "grant_type": JWT_GRANT,
            "assertion": jwt_assertion(
                client_id=self.client_id,
                username=self.username,
                audience=self.audience or self.login_url,
                private_key_pem=self.private_key_pem,
                now=now,
            ),
        }


Flow = ClientCredentials | JwtBearer


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwt_assertion(
    *, client_id: str, username: str, audience: str, private_key_pem: bytes, now: float
) -> str:
    """A signed RS256 JWT for the bearer flow."""
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError("the JWT private key is not an unencrypted PEM key") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigurationError("the JWT private key must be an RSA key (RS256)")
    header = _b64url(json.dumps({"alg": "RS256"}, separators=(",", ":")).encode())
    claims = {"iss": client_id, "sub": username, "aud": audience, "exp": int(now) + JWT_LIFETIME_S}
    body = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{body}".encode("ascii")
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{body}.{_b64url(signature)}"


def flow_from_env(
    environ: Mapping[str, str], *, kind: Literal["client-credentials", "jwt"] | None = None
) -> Flow:
    """The flow the environment describes: JWT when a private key file is named (or asked
    for), client credentials otherwise."""

    def need(name: str) -> str:
        value = environ.get(name, "").strip()
        if not value:
            raise ConfigurationError(f"environment variable {name} is not set")
        return value

    login_url = need(ENV_LOGIN_URL).rstrip("/")
    client_id = need(ENV_CLIENT_ID)
    chosen = kind or ("jwt" if environ.get(ENV_PRIVATE_KEY_FILE) else "client-credentials")
    if chosen == "jwt":
        key_file = Path(need(ENV_PRIVATE_KEY_FILE))
        try:
            key = key_file.read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read {ENV_PRIVATE_KEY_FILE} ({exc.strerror})"
            ) from exc
        return JwtBearer(
            login_url, client_id, need(ENV_USERNAME), key, environ.get(ENV_AUDIENCE) or None
        )
    return ClientCredentials(login_url, client_id, need(ENV_CLIENT_SECRET))


@dataclass(frozen=True)
class Session:
    access_token: str = field(repr=False)
    instance_url: str
    org_id: str

    def pubsub(self) -> PubSubSession:
        return PubSubSession(self.access_token, self.instance_url, self.org_id)


def org_id_from_identity_url(identity: str) -> str:
    """``https://login.salesforce.com/id/00D.../005...`` -> ``00D...``."""
    parts = identity.rstrip("/").split("/")
    if len(parts) < 3 or parts[-3] != "id":
        raise AuthenticationError("the token response's id is not an identity URL")
    return parts[-2]


class Authenticator:
    """Holds the current session; :meth:`refresh` replaces it (after a 401, an UNAUTHENTICATED).

    Thread-safe: the ingest and writeback loops share one authenticator, and a refresh by one
    is seen by the other.
    """

    def __init__(
        self, flow: Flow, http: httpx2.Client, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.flow = flow
        self._http = http
        self._clock = clock
        self._lock = threading.Lock()
        self._session: Session | None = None

    def session(self) -> Session:
        with self._lock:
            if self._session is None:
                self._session = self._request_token()
            return self._session

    def refresh(self, stale: Session | None = None) -> Session:
        """A new session, unless another thread already replaced ``stale``."""
        with self._lock:
            if self._session is None or stale is None or self._session is stale:
                self._session = self._request_token()
            return self._session

    def _request_token(self) -> Session:
        url = f"{self.flow.login_url}{TOKEN_PATH}"
        try:
            response = self._http.post(url, data=self.flow.form(self._clock()))
        except httpx2.HTTPError as exc:
            raise AuthenticationError(
                f"token endpoint {url} unreachable: {type(exc).__name__}"
            ) from exc
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200 or "access_token" not in body:
            # error_description names the problem without echoing credentials.
            reason = body.get("error_description") or body.get("error") or "no reason given"
            raise AuthenticationError(
                f"token endpoint refused the {type(self.flow).__name__} flow: "
                f"{response.status_code} {reason}"
            )
        return Session(
            access_token=str(body["access_token"]),
            instance_url=str(body["instance_url"]).rstrip("/"),
            org_id=org_id_from_identity_url(str(body.get("id", ""))),
        )
