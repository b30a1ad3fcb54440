"""The SAP webhook's limits and guard: token buckets on a fake clock, the key set refresh with a
fake loader, options and secrets, and the refusal to listen beyond loopback unauthenticated."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from pydantic import SecretStr

from connectors.sap.exceptions import SapConfigError
from connectors.sap.webhook import (
    SECRET_VAR,
    WebhookGuard,
    WebhookLimits,
    WebhookSecurity,
    check_listen,
    load_jwks,
    security_from_options,
    server_tls_context,
)
from connectors.sap.webhook_auth import (
    AuthFailure,
    BasicVerifier,
    HmacVerifier,
    JwksCache,
    JwksError,
    JwtVerifier,
)
from connectors.sap.webhook_limits import RateLimiter, TokenBucket, retry_after
from devkit.settings import DEMO_SETTINGS_FILE
from devkit.stack.tls import ensure_authority
from sluiceway import main
from tests.unit.fakes import FakeClock

SECRET = "a-webhook-secret-of-length"
ISSUER = "https://idp.example.com/"
AUDIENCE = "sluiceway"

# ---------------------------------------------------------------------------------- buckets


def test_a_bucket_serves_its_burst_then_one_per_interval() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    for _ in range(3):
        assert bucket.wait_s(now=0.0) == 0
        bucket.take()
    assert bucket.wait_s(now=0.0) == pytest.approx(0.5)
    assert bucket.wait_s(now=0.25) == pytest.approx(0.25)
    assert bucket.wait_s(now=0.5) == 0
    bucket.take()
    # An idle bucket saves up no more than its burst.
    assert bucket.full(now=1000.0)
    assert bucket.tokens == 3


def test_a_clock_stepping_back_refills_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=1)
    bucket.wait_s(now=100.0)
    bucket.take()
    assert bucket.wait_s(now=50.0) == pytest.approx(1.0)
    assert bucket.wait_s(now=100.5) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("rate", "burst"),
    [(0, 1), (-1, 5), (1, 0.5), (float("nan"), 1), (float("inf"), 1), (1, float("inf"))],
)
def test_a_bucket_refuses_limits_that_admit_nothing(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="token bucket"):
        TokenBucket(rate, burst)


def test_a_client_over_its_limit_costs_the_others_nothing() -> None:
    clock = FakeClock(0.0)
    limiter = RateLimiter(per_client_rate=1, per_client_burst=2, total_rate=10, total_burst=4)
    assert [limiter.admit("flood", clock()) for _ in range(5)] == [0, 0, 1.0, 1.0, 1.0]
    # The refused three took no tokens from the overall bucket: two are left for others.
    assert limiter.admit("sap-1", clock()) == 0
    assert limiter.admit("sap-2", clock()) == 0
    assert limiter.admit("sap-3", clock()) == pytest.approx(0.1)  # now the total is spent
    clock.advance(1.0)
    assert limiter.admit("flood", clock()) == 0


def test_the_overall_limit_holds_against_many_addresses() -> None:
    clock = FakeClock(0.0)
    limiter = RateLimiter(
        per_client_rate=100, per_client_burst=100, total_rate=5, total_burst=10, max_clients=50
    )
    admitted = sum(limiter.admit(f"10.0.{i // 256}.{i % 256}", clock()) == 0 for i in range(1000))
    assert admitted == 10
    assert len(limiter.clients) == 50, "client buckets are bounded"
    clock.advance(2.0)
    admitted = sum(limiter.admit(f"10.1.0.{i}", clock()) == 0 for i in range(100))
    assert admitted == 10


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    assert [retry_after(w) for w in (0.01, 0.5, 1.0, 1.2, 59.9)] == ["1", "1", "1", "2", "60"]


# ---------------------------------------------------------------------------------- the guard


def _keyset(key: rsa.RSAPrivateKey, kid: str) -> bytes:
    entry = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid}
    return json.dumps({"keys": [entry]}).encode()


def _bearer(key: rsa.RSAPrivateKey, kid: str, now: float) -> dict[str, str]:
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": int(now) + 300, "sub": "mesh"}
    return {"Authorization": "Bearer " + jwt.encode(claims, key, "RS256", headers={"kid": kid})}


class FakeIssuer:
    """Serves a key set that the test changes (key rotation), counting fetches."""

    def __init__(self, document: bytes) -> None:
        self.document = document
        self.fetches = 0
        self.failing = False

    async def __call__(self, source: str) -> bytes:
        assert source == "https://idp.example.com/jwks"
        self.fetches += 1
        if self.failing:
            raise OSError("connection refused")
        return self.document


def test_the_guard_refetches_keys_on_rotation_but_not_for_every_unknown_kid() -> None:
    old_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer = FakeIssuer(_keyset(old_key, "k1"))
    monotonic = FakeClock(0.0)
    wall = FakeClock(1_750_000_000.0)
    verifier = JwtVerifier(ISSUER, AUDIENCE, JwksCache(min_refetch_s=60))
    guard = WebhookGuard(
        WebhookSecurity(verifier, jwks_source="https://idp.example.com/jwks"),
        monotonic=monotonic,
        wall=wall,
        jwks_loader=issuer,
    )

    async def scenario() -> None:
        await guard.start()
        assert issuer.fetches == 1
        await guard.authenticate(_bearer(old_key, "k1", wall()), b"", "sap")
        # The issuer rotates; a token with the new kid comes before the interval is over.
        issuer.document = _keyset(new_key, "k2")
        monotonic.advance(30)
        for attempt in range(20):  # and a stranger tries random kids meanwhile
            with pytest.raises(AuthFailure, match="unknown_key"):
                await guard.authenticate(_bearer(new_key, f"random-{attempt}", wall()), b"", "x")
        assert issuer.fetches == 1
        monotonic.advance(30)
        await guard.authenticate(_bearer(new_key, "k2", wall()), b"", "sap")
        assert issuer.fetches == 2
        # The old key is gone from the set: its tokens are refused now.
        with pytest.raises(AuthFailure, match="unknown_key"):
            await guard.authenticate(_bearer(old_key, "k1", wall()), b"", "sap")
        # An issuer that does not answer leaves the keys we hold trusted.
        issuer.failing = True
        monotonic.advance(60)
        with pytest.raises(AuthFailure, match="unknown_key"):
            await guard.authenticate(_bearer(new_key, "k3", wall()), b"", "sap")
        assert issuer.fetches == 3
        await guard.authenticate(_bearer(new_key, "k2", wall()), b"", "sap")

    asyncio.run(scenario())
    assert guard.refusals["auth_failures"] == 22
    assert guard.refusals["auth_failures:unknown_key"] == 22


def test_a_guard_that_cannot_load_its_keys_does_not_start() -> None:
    issuer = FakeIssuer(b"<html>login</html>")
    verifier = JwtVerifier(ISSUER, AUDIENCE, JwksCache())
    guard = WebhookGuard(
        WebhookSecurity(verifier, jwks_source="https://idp.example.com/jwks"), jwks_loader=issuer
    )
    with pytest.raises(SapConfigError, match="key set"):
        asyncio.run(guard.start())


def test_the_guard_counts_rate_limited_deliveries() -> None:
    clock = FakeClock(0.0)
    limits = WebhookLimits(per_client_rate=1, per_client_burst=1, total_rate=10, total_burst=10)
    guard = WebhookGuard(WebhookSecurity(None, limits), monotonic=clock)
    assert guard.admit("a") == 0
    assert guard.admit("a") == pytest.approx(1.0)
    assert guard.admit("b") == 0
    assert guard.refusals == {"rate_limited": 1}
    assert not guard.needs_body()
    assert WebhookGuard(WebhookSecurity(HmacVerifier(SecretStr(SECRET)))).needs_body()


def test_a_key_set_is_read_from_a_file_and_plain_http_is_refused_beyond_loopback(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(b'{"keys": []}')
    assert asyncio.run(load_jwks(str(path))) == b'{"keys": []}'
    with pytest.raises(JwksError, match="https"):
        asyncio.run(load_jwks("http://idp.example.com/jwks"))
    path.write_bytes(b" " * (2 << 20))
    with pytest.raises(JwksError, match="larger"):
        asyncio.run(load_jwks(str(path)))


# ---------------------------------------------------------------------------------- options


def test_listening_beyond_loopback_needs_authentication() -> None:
    for host in ("0.0.0.0", "::", "", "10.1.2.3", "sap-connector.internal"):
        with pytest.raises(SapConfigError, match="without authentication") as refused:
            check_listen(host, WebhookSecurity())
        assert "\n" not in str(refused.value), "a one-line error"
    check_listen("127.0.0.1", WebhookSecurity())
    check_listen("::1", WebhookSecurity())
    check_listen("0.0.0.0", WebhookSecurity(BasicVerifier("mesh", SecretStr(SECRET))))


def test_the_webhook_mode_must_be_chosen() -> None:
    with pytest.raises(SapConfigError, match="--webhook-auth"):
        security_from_options(auth=None, environment={})
    with pytest.raises(SapConfigError, match="unknown"):
        security_from_options(auth="magic", environment={})
    assert security_from_options(auth="none", environment={}).verifier is None


@pytest.mark.parametrize("auth", ["basic", "hmac"])
def test_a_shared_secret_comes_from_the_environment_and_is_never_echoed(auth: str) -> None:
    for weak in ("", "hunter2", "x" * 15):
        with pytest.raises(SapConfigError, match=SECRET_VAR) as refused:
            security_from_options(auth=auth, environment={SECRET_VAR: weak}, username="mesh")
        assert not weak or weak not in str(refused.value)
    security = security_from_options(auth=auth, environment={SECRET_VAR: SECRET}, username="mesh")
    assert isinstance(security.verifier, BasicVerifier | HmacVerifier)
    assert SECRET not in repr(security.verifier)


def test_basic_needs_a_username_without_colon() -> None:
    for username in (None, "", "a:b"):
        with pytest.raises(SapConfigError, match="--webhook-username"):
            security_from_options(auth="basic", environment={SECRET_VAR: SECRET}, username=username)


def test_jwt_needs_issuer_audience_and_key_set() -> None:
    with pytest.raises(SapConfigError, match="--webhook-jwks"):
        security_from_options(auth="jwt", environment={}, jwt_issuer=ISSUER, jwt_audience="a")
    security = security_from_options(
        auth="jwt",
        environment={},
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        jwks="/etc/idp/jwks.json",
        jwks_refresh_s=15,
        jwt_leeway_s=5,
    )
    assert isinstance(security.verifier, JwtVerifier)
    assert security.verifier.keys.min_refetch_s == 15
    assert security.verifier.leeway_s == 5
    assert security.jwks_source == "/etc/idp/jwks.json"


def test_limits_must_admit_something() -> None:
    with pytest.raises(SapConfigError, match="rates"):
        WebhookLimits(per_client_rate=0)
    with pytest.raises(SapConfigError, match="events per delivery"):
        WebhookLimits(max_events_per_delivery=0)


def test_tls_takes_both_files_and_speaks_tls_1_2_or_newer(tmp_path: Path) -> None:
    authority = ensure_authority(tmp_path)
    certificate = authority.issue_server(tmp_path, "webhook")
    with pytest.raises(SapConfigError, match="both"):
        security_from_options(auth="none", environment={}, tls_cert=certificate.certificate)
    context = server_tls_context(certificate.certificate, certificate.key)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(SapConfigError, match="TLS certificate"):
        server_tls_context(certificate.certificate, tmp_path / "missing.pem")
    with pytest.raises(SapConfigError, match="TLS certificate"):
        server_tls_context(certificate.key, certificate.certificate)  # swapped


def test_the_cli_refuses_an_open_unauthenticated_webhook_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_VAR, raising=False)
    mapping = Path(__file__).resolve().parents[2] / "connectors/sap/mappings/supplier_invoice.yaml"
    common = ["--config", str(DEMO_SETTINGS_FILE), "connect-sap", "--mapping", str(mapping)]
    common += ["--base-url", "http://127.0.0.1:9", "--auth", "none"]
    cases = {
        ("--listen", "0.0.0.0:8089", "--webhook-auth", "none"): "without authentication",
        ("--listen", "[::]:8089", "--webhook-auth", "none"): "without authentication",
        ("--listen", "127.0.0.1:8089"): "needs --webhook-auth",
        ("--listen", "0.0.0.0:8089", "--webhook-auth", "hmac"): SECRET_VAR,
    }
    for extra, message in cases.items():
        assert main([*common, *extra]) == 2
        error = capsys.readouterr().err
        assert message in error
        assert error.count("\n") == 1, error
