"""The secured stack's token issuer: an RSA key, its JWKS file, and signed JWTs (RS256).

Kafka's OAUTHBEARER listener validates a token's signature against ``oauth-jwks.json``
(``sasl.oauthbearer.jwks.endpoint.url=file://...``), its ``iss`` and ``aud``, and takes the
principal from ``sub``: the same names as the SCRAM users and certificate CNs. There is no
token endpoint in the local stack: :func:`mint_token` signs a token directly, which is what a
test's ``oauth_cb`` or ``sluiceway stack token`` uses. A production deployment points the
broker at its identity provider's JWKS URL instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from devkit.stack.secrets import secrets_dir, write_secret_once

ISSUER = "sluiceway-local-stack"
AUDIENCE = "sluiceway-kafka"
DEFAULT_LIFETIME_S = 3600.0


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_bytes(number: int) -> bytes:
    return number.to_bytes((number.bit_length() + 7) // 8, "big")


def key_id(key: rsa.RSAPublicKey) -> str:
    """A stable ``kid``: the SHA-256 of the public key's DER form."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _b64url(hashlib.sha256(der).digest())[:16]


def jwks(key: rsa.RSAPublicKey) -> dict[str, list[dict[str, str]]]:
    """The JSON Web Key Set publishing ``key`` for RS256 signatures."""
    numbers = key.public_numbers()
    return {
        "keys": [
            {
                "kty": "RSA",
                "use": "sig",
                "alg": "RS256",
                "kid": key_id(key),
                "n": _b64url(_int_bytes(numbers.n)),
                "e": _b64url(_int_bytes(numbers.e)),
            }
        ]
    }


def mint_token(
    key: rsa.RSAPrivateKey,
    subject: str,
    *,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    lifetime_s: float = DEFAULT_LIFETIME_S,
    now: float | None = None,
    kid: str | None = None,
) -> str:
    """A compact RS256 JWT for ``subject`` (pure apart from the default ``now``)."""
    issued = int(time.time() if now is None else now)
    header = {"alg": "RS256", "typ": "JWT", "kid": kid or key_id(key.public_key())}
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": issued,
        "nbf": issued - 5,
        "exp": issued + int(lifetime_s),
        "scope": "kafka",
    }
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"


@dataclass(frozen=True)
class Issuer:
    """The stack's issuer key and the JWKS file the broker trusts."""

    key_file: Path
    jwks_file: Path

    def private_key(self) -> rsa.RSAPrivateKey:
        key = serialization.load_pem_private_key(self.key_file.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TypeError(f"{self.key_file}: expected the stack issuer's RSA key")
        return key

    def token(self, subject: str, lifetime_s: float = DEFAULT_LIFETIME_S) -> str:
        return mint_token(self.private_key(), subject, lifetime_s=lifetime_s)


def ensure_issuer(state_dir: Path) -> Issuer:
    """Return the stack's issuer, generating its key (0600) and JWKS file on first use."""
    folder = secrets_dir(state_dir)
    issuer = Issuer(folder / "oauth-issuer-key.pem", folder / "oauth-jwks.json")
    if not issuer.key_file.is_file():
        generated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        write_secret_once(
            issuer.key_file,
            generated.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
    # Derived from whichever key won the creation race, so the two always agree.
    published = json.dumps(jwks(issuer.private_key().public_key()), indent=2)
    issuer.jwks_file.write_text(published + "\n", encoding="utf-8")
    return issuer
