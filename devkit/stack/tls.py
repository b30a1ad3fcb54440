"""A certificate authority of the secured local stack, and the certificates it issues.

The secured stack (``stack.secured: true``) encrypts every connection: Kafka's and MinIO's
listeners present a server certificate signed by a CA that ``sluiceway stack up`` generates
once per state folder, and clients that authenticate with a certificate (mTLS) get one from
the same CA, its subject common name being the principal's name. Everything is PEM, which
librdkafka, Kafka (``ssl.keystore.type=PEM``), MinIO and Python's ``ssl`` all read.

Files are written once and reused: restarting the stack keeps the CA its clients trust.
Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "Sluiceway local stack CA"
VALIDITY = datetime.timedelta(days=825)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both PEM files."""

    certificate: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """The stack's CA: ``certificate`` is what clients trust (``ssl.ca.location``)."""

    certificate: Path
    key: Path

    def issue_server(
        self, folder: Path, name: str, hosts: tuple[str, ...] = LOOPBACK_NAMES
    ) -> KeyPair:
        """Issue (once) a server certificate valid for ``hosts`` under ``folder/<name>.pem``."""
        return self._issue(folder, name, hosts=hosts, usage=ExtendedKeyUsageOID.SERVER_AUTH)

    def issue_client(self, folder: Path, principal: str) -> KeyPair:
        """Issue (once) a client certificate whose subject is ``CN=<principal>``."""
        return self._issue(folder, principal, hosts=(), usage=ExtendedKeyUsageOID.CLIENT_AUTH)

    def _issue(
        self, folder: Path, name: str, *, hosts: tuple[str, ...], usage: x509.ObjectIdentifier
    ) -> KeyPair:
        pair = KeyPair(folder / f"{name}.pem", folder / f"{name}-key.pem")
        if pair.certificate.is_file() and pair.key.is_file():
            return pair
        ca_key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(self.certificate.read_bytes())
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise TypeError(f"{self.key}: expected the stack CA's EC private key")
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(host) for host in hosts]),
                critical=False,
            )
        certificate = builder.sign(ca_key, hashes.SHA256())
        folder.mkdir(parents=True, exist_ok=True)
        _write_key(pair.key, key)
        pair.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return pair


def ensure_authority(folder: Path) -> Authority:
    """Return the CA under ``folder``, generating it on first use."""
    authority = Authority(folder / "ca.pem", folder / "ca-key.pem")
    if authority.certificate.is_file() and authority.key.is_file():
        return authority
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    _write_key(authority.key, key)
    authority.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return authority


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
