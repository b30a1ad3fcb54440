"""Who may post to the SAP webhook: every mode against what a stranger can send.

Pure verification (``connectors.sap.webhook_auth``) on a fixed clock: no server, no network.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import SecretStr

from connectors.sap.webhook_auth import (
    MAX_CREDENTIAL_CHARS,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    AuthFailure,
    BasicVerifier,
    HmacVerifier,
    JwksCache,
    JwksError,
    JwtVerifier,
    hmac_signature,
    is_loopback,
    parse_jwks,
    token_kid,
)

NOW = 1_750_000_000.0
SECRET = "s3cret-value-of-some-length"
ISSUER = "https://idp.example.com/"
AUDIENCE = "sluiceway-sap-webhook"
BODY = b'{"specversion": "1.0", "id": "evt-1"}'


def _refused(reason: str, verify: Any, headers: dict[str, str], body: bytes = BODY) -> AuthFailure:
    with pytest.raises(AuthFailure) as refused:
        verify(headers, body, NOW)
    assert refused.value.reason == reason
    assert refused.value.challenge, "a 401 always says how to authenticate"
    for text in (str(refused.value), refused.value.challenge):
        assert SECRET not in text
    return refused.value


# ---------------------------------------------------------------------------------- Basic

BASIC = BasicVerifier("event-mesh", SecretStr(SECRET))


def _basic(username: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{secret}".encode()).decode()}


def test_basic_accepts_the_configured_user_and_secret() -> None:
    assert BASIC.verify(_basic("event-mesh", SECRET), BODY, NOW) == "event-mesh"
    # Header names are case-insensitive, and so is the scheme.
    (value,) = _basic("event-mesh", SECRET).values()
    assert BASIC.verify({"authorization": value.replace("Basic", "basic")}, BODY, NOW)


def test_a_secret_may_hold_colons() -> None:
    verifier = BasicVerifier("u", SecretStr("a:b:c-and-more-characters"))
    assert verifier.verify(_basic("u", "a:b:c-and-more-characters"), BODY, NOW) == "u"


def test_basic_refuses_a_wrong_secret_or_user_without_echoing_them() -> None:
    failure = _refused("wrong_credentials", BASIC.verify, _basic("event-mesh", "guess"))
    assert failure.challenge.startswith('Basic realm="sluiceway"')
    _refused("wrong_credentials", BASIC.verify, _basic("admin", SECRET))
    _refused("wrong_credentials", BASIC.verify, _basic("event-mesh", SECRET + "x"))
    _refused("wrong_credentials", BASIC.verify, _basic("event-mesh", SECRET[:-1]))
    _refused("wrong_credentials", BASIC.verify, _basic("", ""))


def test_basic_refuses_a_missing_header() -> None:
    _refused("missing_credentials", BASIC.verify, {})
    _refused("missing_credentials", BASIC.verify, {"Authorization": "   "})


@pytest.mark.parametrize(
    "value",
    [
        "Basic",
        "Basic ",
        "Bearer abc.def.ghi",
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"no-colon-here").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),  # not UTF-8
        "BasicZXZlbnQtbWVzaDpzZWNyZXQ=",
        "Digest username=event-mesh",
    ],
)
def test_basic_refuses_malformed_authorization(value: str) -> None:
    _refused("malformed_authorization", BASIC.verify, {"Authorization": value})


def test_an_oversized_authorization_header_is_refused_unread() -> None:
    huge = "Basic " + "A" * (MAX_CREDENTIAL_CHARS + 1)
    _refused("oversized_credentials", BASIC.verify, {"Authorization": huge})


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_basic_answers_any_authorization_with_a_refusal_never_a_crash(value: str) -> None:
    with pytest.raises(AuthFailure):
        BASIC.verify({"Authorization": value}, BODY, NOW)


# ---------------------------------------------------------------------------------- HMAC

HMAC = HmacVerifier(SecretStr(SECRET), tolerance_s=300)


def _signed(
    body: bytes = BODY, timestamp: str | None = None, secret: str = SECRET
) -> dict[str, str]:
    stamp = timestamp if timestamp is not None else str(int(NOW))
    return {
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: hmac_signature(secret.encode(), stamp, body),
    }


def test_hmac_accepts_a_fresh_signature_of_the_body() -> None:
    assert HMAC.verify(_signed(), BODY, NOW) == "hmac"
    # The signature is HMAC-SHA256 over "<timestamp>.<body>", as documented.
    expected = hmac.new(SECRET.encode(), f"{int(NOW)}.".encode() + BODY, hashlib.sha256)
    assert _signed()[SIGNATURE_HEADER] == "sha256=" + expected.hexdigest()
    # Within the tolerance either way (clocks drift).
    assert HMAC.verify(_signed(timestamp=str(int(NOW) - 299)), BODY, NOW)
    assert HMAC.verify(_signed(timestamp=str(int(NOW) + 299)), BODY, NOW)


def test_hmac_refuses_a_tampered_body() -> None:
    headers = _signed()
    _refused("bad_signature", HMAC.verify, headers, BODY.replace(b"evt-1", b"evt-2"))
    _refused("bad_signature", HMAC.verify, headers, BODY + b" ")
    _refused("bad_signature", HMAC.verify, headers, b"")


def test_hmac_refuses_another_secret() -> None:
    _refused("bad_signature", HMAC.verify, _signed(secret="another-secret-of-length"))


def test_hmac_refuses_old_and_future_timestamps() -> None:
    _refused("stale_timestamp", HMAC.verify, _signed(timestamp=str(int(NOW) - 301)))
    _refused("stale_timestamp", HMAC.verify, _signed(timestamp=str(int(NOW) + 301)))
    _refused("stale_timestamp", HMAC.verify, _signed(timestamp="0"))


def test_a_replayed_delivery_cannot_borrow_a_fresh_timestamp() -> None:
    old = _signed(timestamp=str(int(NOW) - 3600))
    replayed = {**old, TIMESTAMP_HEADER: str(int(NOW))}
    _refused("bad_signature", HMAC.verify, replayed)


@pytest.mark.parametrize(
    "stamp",
    [
        "1e9",
        "-5",
        "+1750000000",
        " 1750000000",
        "1750000000.5",
        "NaN",
        "\u0661\u0667\u0665\u0660",  # Arabic-Indic digits: str.isdigit() says yes
        "9" * 13,
    ],
)
def test_hmac_refuses_timestamps_that_are_not_plain_seconds(stamp: str) -> None:
    headers = _signed(timestamp=stamp)
    if stamp.strip() != stamp:  # a header value arrives stripped of its outer spaces
        headers[TIMESTAMP_HEADER] = stamp.strip() + "x"
    _refused("malformed_timestamp", HMAC.verify, headers)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {SIGNATURE_HEADER: "sha256=00"},
        {TIMESTAMP_HEADER: str(int(NOW))},
    ],
)
def test_hmac_refuses_missing_headers(headers: dict[str, str]) -> None:
    _refused("missing_credentials", HMAC.verify, headers)


@pytest.mark.parametrize(
    "signature", ["", "00", "sha256=", "sha1=" + "0" * 40, "sha256=" + "z" * 64, "é" * 70]
)
def test_hmac_refuses_malformed_signatures(signature: str) -> None:
    headers = {**_signed(), SIGNATURE_HEADER: signature}
    reason = "missing_credentials" if not signature else "bad_signature"
    _refused(reason, HMAC.verify, headers)


def test_hmac_refuses_oversized_signature_headers() -> None:
    headers = {**_signed(), SIGNATURE_HEADER: "sha256=" + "0" * MAX_CREDENTIAL_CHARS}
    _refused("oversized_credentials", HMAC.verify, headers)
    headers = {**_signed(), TIMESTAMP_HEADER: "1" * (MAX_CREDENTIAL_CHARS + 1)}
    _refused("oversized_credentials", HMAC.verify, headers)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80), st.text(max_size=80), st.binary(max_size=200))
def test_hmac_answers_any_headers_with_a_refusal_never_a_crash(
    stamp: str, signature: str, body: bytes
) -> None:
    with pytest.raises(AuthFailure):
        HMAC.verify({TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: signature}, body, NOW)


# ---------------------------------------------------------------------------------- JWT


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str, **extra: Any) -> Any:
    if isinstance(key, rsa.RSAPrivateKey):
        entry = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        entry = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**entry, "kid": kid, "use": "sig", **extra}


def _keyset(*entries: Any) -> str:
    return json.dumps({"keys": list(entries)})


@pytest.fixture
def verifier(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> JwtVerifier:
    cache = JwksCache()
    cache.fetched(_keyset(_jwk(rsa_key, "rsa-1"), _jwk(ec_key, "ec-1")), now=0.0)
    return JwtVerifier(ISSUER, AUDIENCE, cache, leeway_s=30)


def _claims(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "event-mesh-client",
        "iat": int(NOW) - 10,
        "nbf": int(NOW) - 10,
        "exp": int(NOW) + 600,
    }
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not None}


def _token(key: Any, algorithm: str = "RS256", kid: str | None = "rsa-1", **changes: Any) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(_claims(**changes), key, algorithm=algorithm, headers=headers)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forged(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A token assembled by hand, as an attacker would (PyJWT refuses to make these)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = b"" if secret is None else hmac.digest(secret, signing_input.encode(), "sha256")
    return f"{signing_input}.{_b64(signature)}"


def test_jwt_accepts_rs256_and_es256_tokens_of_the_issuer(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    assert verifier.verify(_bearer(_token(rsa_key)), BODY, NOW) == "event-mesh-client"
    assert verifier.verify(_bearer(_token(ec_key, "ES256", "ec-1")), BODY, NOW)
    # An audience list that holds ours is fine.
    assert verifier.verify(_bearer(_token(rsa_key, aud=["other", AUDIENCE])), BODY, NOW)


def test_jwt_times_are_checked_with_a_small_leeway(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    assert verifier.verify(_bearer(_token(rsa_key, exp=int(NOW) - 29)), BODY, NOW)
    _refused("expired", verifier.verify, _bearer(_token(rsa_key, exp=int(NOW) - 31)))
    assert verifier.verify(_bearer(_token(rsa_key, nbf=int(NOW) + 29)), BODY, NOW)
    _refused("not_yet_valid", verifier.verify, _bearer(_token(rsa_key, nbf=int(NOW) + 31)))


@pytest.mark.parametrize("exp", [None, "9999999999", True, float("inf")])
def test_jwt_needs_a_numeric_expiry(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey, exp: Any
) -> None:
    token = _forged_rs256(rsa_key, _claims(exp=exp)) if exp == float("inf") else None
    token = token or _token(rsa_key, exp=exp)
    reason = "missing_claim" if exp is None else "invalid_token"
    _refused(reason, verifier.verify, _bearer(token))


def _forged_rs256(key: rsa.RSAPrivateKey, claims: dict[str, Any]) -> str:
    # json.dumps writes Infinity, which PyJWT's own encoder refuses to.
    signing_input = (
        f"{_b64(json.dumps({'alg': 'RS256', 'kid': 'rsa-1'}).encode())}."
        f"{_b64(json.dumps(claims).encode())}"
    )
    signature = RSAAlgorithm(RSAAlgorithm.SHA256).sign(signing_input.encode(), key)
    return f"{signing_input}.{_b64(signature)}"


def test_jwt_refuses_another_issuer_or_audience(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    _refused("wrong_issuer", verifier.verify, _bearer(_token(rsa_key, iss="https://evil/")))
    _refused("wrong_audience", verifier.verify, _bearer(_token(rsa_key, aud="another-api")))
    _refused("missing_claim", verifier.verify, _bearer(_token(rsa_key, aud=None)))
    _refused("missing_claim", verifier.verify, _bearer(_token(rsa_key, iss=None)))


def test_jwt_refuses_an_unknown_kid(verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    _refused("unknown_key", verifier.verify, _bearer(_token(rsa_key, kid="rsa-2")))
    # Without kid a token is only accepted against a set of exactly one key.
    _refused("unknown_key", verifier.verify, _bearer(_token(rsa_key, kid=None)))
    single = JwksCache()
    single.fetched(_keyset(_jwk(rsa_key, "only")), now=0.0)
    alone = JwtVerifier(ISSUER, AUDIENCE, single)
    assert alone.verify(_bearer(_token(rsa_key, kid=None)), BODY, NOW)


def test_jwt_refuses_a_token_signed_by_another_key_under_a_known_kid(
    verifier: JwtVerifier,
) -> None:
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _refused("bad_signature", verifier.verify, _bearer(_token(impostor, kid="rsa-1")))


def test_jwt_refuses_a_tampered_payload(verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    header, _payload, signature = _token(rsa_key).split(".")
    other = _b64(json.dumps(_claims(sub="admin")).encode())
    _refused("bad_signature", verifier.verify, _bearer(f"{header}.{other}.{signature}"))


def test_jwt_refuses_alg_none(verifier: JwtVerifier) -> None:
    for alg in ("none", "None", "NONE"):
        unsigned = _forged({"alg": alg, "kid": "rsa-1"}, _claims(), None)
        _refused("refused_algorithm", verifier.verify, _bearer(unsigned))
    _refused(
        "refused_algorithm", verifier.verify, _bearer(_forged({"kid": "rsa-1"}, _claims(), None))
    )


def test_jwt_refuses_hs256_signed_with_the_public_rsa_key(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    """The classic confusion: the "secret" of an HMAC token is the public key anyone holds."""
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for alg in ("HS256", "HS384", "HS512"):
        forged = _forged({"alg": alg, "kid": "rsa-1", "typ": "JWT"}, _claims(), public_pem)
        _refused("refused_algorithm", verifier.verify, _bearer(forged))


def test_jwt_refuses_an_algorithm_that_does_not_fit_the_key(
    verifier: JwtVerifier, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    # An EC-signed token naming the RSA key, and the other way round.
    _refused("algorithm_key_mismatch", verifier.verify, _bearer(_token(ec_key, "ES256", "rsa-1")))
    _refused("algorithm_key_mismatch", verifier.verify, _bearer(_token(rsa_key, "RS256", "ec-1")))
    # ES512 is defined on P-521 only: a P-256 key does not check it.
    forged = _forged({"alg": "ES512", "kid": "ec-1"}, _claims(), b"x")
    _refused("algorithm_key_mismatch", verifier.verify, _bearer(forged))


def test_jwt_keeps_to_the_algorithm_a_jwk_pins(rsa_key: rsa.RSAPrivateKey) -> None:
    cache = JwksCache()
    cache.fetched(_keyset(_jwk(rsa_key, "rsa-1", alg="RS256")), now=0.0)
    pinned = JwtVerifier(ISSUER, AUDIENCE, cache)
    assert pinned.verify(_bearer(_token(rsa_key, "RS256")), BODY, NOW)
    _refused("algorithm_key_mismatch", pinned.verify, _bearer(_token(rsa_key, "PS256")))


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing_credentials"),
        ({"Authorization": "Bearer"}, "malformed_authorization"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "malformed_authorization"),
        ({"Authorization": "Bearer a.b"}, "malformed_token"),
        ({"Authorization": "Bearer !!!.???.***"}, "malformed_token"),
        ({"Authorization": "Bearer " + _b64(b"[1,2]") + ".e30.sig"}, "malformed_token"),
        ({"Authorization": "Bearer " + "a" * (MAX_CREDENTIAL_CHARS + 1)}, "oversized_credentials"),
    ],
)
def test_jwt_refuses_malformed_authorization(
    verifier: JwtVerifier, headers: dict[str, str], reason: str
) -> None:
    failure = _refused(reason, verifier.verify, headers)
    if reason == "missing_credentials":
        assert failure.challenge == 'Bearer realm="sluiceway"'
    else:
        assert "error=" in failure.challenge


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_jwt_answers_any_bearer_value_with_a_refusal_never_a_crash(value: str) -> None:
    cache = JwksCache()
    cache.fetched(_keyset({"kty": "EC", "crv": "P-256", "kid": "k", **_EC_POINT}), now=0.0)
    with pytest.raises(AuthFailure):
        JwtVerifier(ISSUER, AUDIENCE, cache).verify({"Authorization": f"Bearer {value}"}, b"", NOW)


_EC_POINT = {
    key: value
    for key, value in ECAlgorithm.to_jwk(
        ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True
    ).items()
    if key in ("x", "y")
}


# ---------------------------------------------------------------------------------- key sets


def test_a_key_set_keeps_only_public_signing_keys(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    private = RSAAlgorithm.to_jwk(rsa_key, as_dict=True)
    keys = parse_jwks(
        _keyset(
            _jwk(rsa_key, "rsa"),
            _jwk(ec_key, "ec"),
            {"kty": "oct", "kid": "hmac", "k": _b64(b"shared")},
            _jwk(rsa_key, "for-encryption", use="enc"),
            _jwk(rsa_key, "hs-pinned", alg="HS256"),
            {**private, "kid": "private"},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "not an object",
            None,
        )
    )
    assert set(keys) == {"rsa", "ec"}


@pytest.mark.parametrize(
    "document",
    [b"", b"not json", b"[]", b'{"keys": {}}', b'{"keys": []}', b'{"keys": [{"kty": "oct"}]}'],
)
def test_an_unusable_key_set_is_an_error(document: bytes) -> None:
    with pytest.raises(JwksError):
        parse_jwks(document)


def test_the_key_cache_refetches_for_an_unknown_kid_at_most_every_interval(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    cache = JwksCache(min_refetch_s=60, max_age_s=3600)
    assert cache.fetch_due("rsa-1", now=0.0), "nothing fetched yet"
    cache.fetched(_keyset(_jwk(rsa_key, "rsa-1")), now=0.0)
    assert not cache.fetch_due("rsa-1", now=10.0)
    assert not cache.fetch_due("rotated", now=59.0), "a stranger's random kid waits"
    assert cache.fetch_due("rotated", now=60.0)
    assert not cache.fetch_due("rsa-1", now=3599.0)
    assert cache.fetch_due("rsa-1", now=3600.0), "withdrawn keys are not trusted forever"
    # A broken answer keeps the keys we had, and counts as an attempt.
    with pytest.raises(JwksError):
        cache.fetched(b"<html>", now=100.0)
    assert set(cache.keys) == {"rsa-1"}
    assert not cache.fetch_due("rotated", now=150.0)
    cache.failed(now=200.0)
    assert not cache.fetch_due("rotated", now=259.0)
    assert cache.fetch_due("rotated", now=260.0)


def test_the_kid_of_a_request_is_read_without_trusting_it(rsa_key: rsa.RSAPrivateKey) -> None:
    assert token_kid(_bearer(_token(rsa_key, kid="rsa-9"))) == "rsa-9"
    assert token_kid(_bearer(_token(rsa_key, kid=None))) is None
    assert token_kid({"Authorization": "Bearer garbage"}) is None
    assert token_kid({}) is None
    long_kid = _forged({"alg": "RS256", "kid": "k" * 1000}, _claims(), b"x")
    assert token_kid(_bearer(long_kid)) is None


# ---------------------------------------------------------------------------------- listening


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.5", False),
        ("example.com", False),
        ("127.1", False),  # not an address Python reads; a name may resolve anywhere
        ("localhost.evil.com", False),
    ],
)
def test_only_plain_loopback_counts_as_local(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
