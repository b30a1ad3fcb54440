"""What stands between the internet and the SAP connector's CloudEvents receiver.

A delivery (``POST <path>``) passes, in this order: the rate limit (429 + ``Retry-After``),
the body size limit (413, aiohttp's ``client_max_size``), authentication (401 +
``WWW-Authenticate``), then the cap on events per delivery (413). Nothing of a refused
delivery is published or dead-lettered. The verification itself is pure
(:mod:`connectors.sap.webhook_auth`, :mod:`connectors.sap.webhook_limits`); this module does
the I/O around it: fetching a JWKS, the TLS context, reading options and secrets.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from pydantic import SecretStr

from connectors.sap.exceptions import SapConfigError
from connectors.sap.webhook_auth import (
    AuthFailure,
    BasicVerifier,
    HmacVerifier,
    JwksCache,
    JwksError,
    JwtVerifier,
    Verifier,
    is_loopback,
    token_kid,
)
from connectors.sap.webhook_limits import RateLimiter

log = logging.getLogger(__name__)

SECRET_VAR = "SAP_WEBHOOK_SECRET"  # noqa: S105 (a variable's name, not a secret)
"""The environment variable holding the webhook's shared secret (Basic password, HMAC key)."""
MIN_SECRET_CHARS = 16
"""A shorter shared secret is refused: it could be guessed, rate limit or not."""
MAX_JWKS_BYTES = 1 << 20
AUTH_MODES = ("basic", "jwt", "hmac", "none")


@dataclass(frozen=True)
class WebhookLimits:
    """Deliveries a second per client address and overall (with the bursts they may save
    up), and the events one delivery may carry."""

    per_client_rate: float = 100.0
    per_client_burst: float = 200.0
    total_rate: float = 400.0
    total_burst: float = 800.0
    max_events_per_delivery: int = 100

    def __post_init__(self) -> None:
        if self.max_events_per_delivery < 1:
            raise SapConfigError("the events per delivery limit must be at least 1")
        try:
            RateLimiter(
                self.per_client_rate, self.per_client_burst, self.total_rate, self.total_burst
            )
        except ValueError:
            raise SapConfigError(
                "webhook rates must be > 0 and bursts at least 1 "
                f"(per client {self.per_client_rate}/s burst {self.per_client_burst}, "
                f"total {self.total_rate}/s burst {self.total_burst})"
            ) from None


JwksLoader = Callable[[str], Awaitable[bytes]]


@dataclass
class WebhookSecurity:
    """How the receiver is guarded: ``verifier`` ``None`` means no authentication, which
    :func:`check_listen` allows on a loopback address only."""

    verifier: Verifier | None = None
    limits: WebhookLimits = field(default_factory=WebhookLimits)
    jwks_source: str | None = None
    """Where a :class:`JwtVerifier` gets its keys: a file path or an https URL."""
    tls: ssl.SSLContext | None = None


def check_listen(host: str, security: WebhookSecurity) -> None:
    """Refuse to take deliveries from other machines without authentication."""
    if security.verifier is None and not is_loopback(host):
        raise SapConfigError(
            f"refusing to listen on {host or 'every interface'!r} without authentication: "
            "use --webhook-auth basic|jwt|hmac, or listen on 127.0.0.1"
        )
    if not is_loopback(host) and security.tls is None:
        log.warning(
            'webhook listens on "%s" without TLS: credentials cross the network in clear '
            "unless a TLS proxy stands in front (--tls-cert/--tls-key)",
            host,
        )


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for the receiver: the given chain and key, TLS 1.2 or newer."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as failure:
        raise SapConfigError(f"TLS certificate {cert} / key {key}: {failure}") from None
    return context


async def load_jwks(source: str) -> bytes:
    """The key set at ``source``: a file, or an https URL (plain http only on loopback, or
    whoever sits on the path could hand us their own keys)."""
    parts = urlsplit(source)
    if parts.scheme not in ("http", "https"):
        return await asyncio.to_thread(_read_capped, Path(source))
    if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
        raise JwksError(f"a key set URL must be https (got {source!r})")
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(source) as answer:
        answer.raise_for_status()
        document = await answer.content.read(MAX_JWKS_BYTES + 1)
    if len(document) > MAX_JWKS_BYTES:
        raise JwksError(f"the key set at {source} is larger than {MAX_JWKS_BYTES} bytes")
    return document


def _read_capped(path: Path) -> bytes:
    with path.open("rb") as file:
        document = file.read(MAX_JWKS_BYTES + 1)
    if len(document) > MAX_JWKS_BYTES:
        raise JwksError(f"the key set {path} is larger than {MAX_JWKS_BYTES} bytes")
    return document


class WebhookGuard:
    """The running checks of one receiver: its rate limiter, its verifier and key cache,
    and counters of what was refused and why."""

    def __init__(
        self,
        security: WebhookSecurity,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        jwks_loader: JwksLoader = load_jwks,
    ) -> None:
        self.security = security
        limits = security.limits
        self.limiter = RateLimiter(
            limits.per_client_rate, limits.per_client_burst, limits.total_rate, limits.total_burst
        )
        self.refusals: dict[str, int] = {}
        self._monotonic = monotonic
        self._wall = wall
        self._jwks_loader = jwks_loader
        self._fetching = asyncio.Lock()
        self._last_logged: dict[str, float] = {}

    @property
    def max_events(self) -> int:
        return self.security.limits.max_events_per_delivery

    async def start(self) -> None:
        """Fetch the key set once before listening: a wrong path or URL stops the start."""
        verifier = self.security.verifier
        if isinstance(verifier, JwtVerifier):
            source = self._jwks_source()
            try:
                verifier.keys.fetched(await self._jwks_loader(source), self._monotonic())
            except (JwksError, OSError, aiohttp.ClientError, TimeoutError) as failure:
                raise SapConfigError(f"webhook key set {source}: {failure}") from None

    def admit(self, client: str) -> float:
        """0 when a delivery from ``client`` may go on, else the seconds it should wait."""
        wait = self.limiter.admit(client, self._monotonic())
        if wait > 0:
            self._count("rate_limited", client)
        return wait

    def needs_body(self) -> bool:
        """Whether authentication needs the body (HMAC); the others run before it is read."""
        return isinstance(self.security.verifier, HmacVerifier)

    async def authenticate(self, headers: Mapping[str, str], body: bytes, client: str) -> None:
        """Raises :class:`AuthFailure` (counted, logged without the credential)."""
        verifier = self.security.verifier
        if verifier is None:
            return
        if isinstance(verifier, JwtVerifier):
            await self._refresh_keys(verifier.keys, token_kid(headers))
        try:
            verifier.verify(headers, body, self._wall())
        except AuthFailure as failure:
            self._count("auth_failures", client, failure.reason)
            raise

    async def _refresh_keys(self, cache: JwksCache, kid: str | None) -> None:
        if not cache.fetch_due(kid, self._monotonic()):
            return
        async with self._fetching:  # concurrent deliveries wait for one fetch
            if not cache.fetch_due(kid, self._monotonic()):
                return
            source = self._jwks_source()
            try:
                cache.fetched(await self._jwks_loader(source), self._monotonic())
            except (JwksError, OSError, aiohttp.ClientError, TimeoutError) as failure:
                # The keys we hold stay trusted; the next try waits out the refetch interval.
                cache.failed(self._monotonic())
                log.warning('webhook key set not refreshed source="%s" error="%s"', source, failure)

    def _jwks_source(self) -> str:
        if self.security.jwks_source is None:
            raise SapConfigError("webhook auth jwt needs a key set (--webhook-jwks)")
        return self.security.jwks_source

    def _count(self, kind: str, client: str, reason: str | None = None) -> None:
        key = f"{kind}:{reason}" if reason else kind
        self.refusals[kind] = self.refusals.get(kind, 0) + 1
        if reason:
            self.refusals[key] = self.refusals.get(key, 0) + 1
        # One line per kind of refusal every 10 s at most: a flood must not flood the log.
        now = self._monotonic()
        if now - self._last_logged.get(key, -10.0) >= 10.0:
            self._last_logged[key] = now
            log.warning(
                'webhook delivery refused kind="%s" reason="%s" client="%s" count="%d"',
                kind,
                reason or "-",
                client,
                self.refusals.get(key, 0),
            )


def security_from_options(
    *,
    auth: str | None,
    environment: Mapping[str, str],
    username: str | None = None,
    jwt_issuer: str | None = None,
    jwt_audience: str | None = None,
    jwks: str | None = None,
    jwks_refresh_s: float = 60.0,
    jwt_leeway_s: float = 30.0,
    hmac_tolerance_s: float = 300.0,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    limits: WebhookLimits | None = None,
) -> WebhookSecurity:
    """The receiver's guard from ``connect-sap`` options; the shared secret comes from
    ``SAP_WEBHOOK_SECRET`` in ``environment`` and appears in no message."""
    if auth is None:
        raise SapConfigError(
            "the webhook needs --webhook-auth basic|jwt|hmac (or 'none', for local use on "
            "a loopback address only)"
        )
    if auth not in AUTH_MODES:
        raise SapConfigError(f"unknown --webhook-auth {auth!r} ({', '.join(AUTH_MODES)})")
    if (tls_cert is None) != (tls_key is None):
        raise SapConfigError("TLS needs both --tls-cert and --tls-key")
    tls = server_tls_context(tls_cert, tls_key) if tls_cert and tls_key else None
    verifier: Verifier | None = None
    if auth in ("basic", "hmac"):
        secret = environment.get(SECRET_VAR, "")
        if len(secret) < MIN_SECRET_CHARS:
            raise SapConfigError(
                f"webhook auth {auth}: environment variable {SECRET_VAR} must hold a secret "
                f"of at least {MIN_SECRET_CHARS} characters"
            )
        if auth == "basic":
            if not username or ":" in username:
                raise SapConfigError("webhook auth basic needs --webhook-username (without ':')")
            verifier = BasicVerifier(username, SecretStr(secret))
        else:
            verifier = HmacVerifier(SecretStr(secret), tolerance_s=hmac_tolerance_s)
    elif auth == "jwt":
        if not (jwt_issuer and jwt_audience and jwks):
            raise SapConfigError(
                "webhook auth jwt needs --webhook-jwt-issuer, --webhook-jwt-audience and "
                "--webhook-jwks (a JWKS file or https URL)"
            )
        verifier = JwtVerifier(
            jwt_issuer, jwt_audience, JwksCache(min_refetch_s=jwks_refresh_s), jwt_leeway_s
        )
    return WebhookSecurity(
        verifier=verifier,
        limits=limits or WebhookLimits(),
        jwks_source=jwks if auth == "jwt" else None,
        tls=tls,
    )
