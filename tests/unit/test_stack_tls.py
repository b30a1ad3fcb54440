"""The stack's CA: its certificates pass a real TLS handshake, mutual authentication included."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest

from devkit.stack.tls import ensure_authority


def _handshake(tmp_path: Path, *, client_cert: bool) -> str | None:
    """Run one TLS handshake over loopback; return the client's CN the server saw."""
    authority = ensure_authority(tmp_path / "tls")
    server_pair = authority.issue_server(tmp_path / "tls", "kafka")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(server_pair.certificate, server_pair.key)
    server.load_verify_locations(authority.certificate)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(cafile=str(authority.certificate))
    if client_cert:
        client_pair = authority.issue_client(tmp_path / "tls", "worker-scaler")
        client.load_cert_chain(client_pair.certificate, client_pair.key)
    seen: list[str | None] = []
    failures: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def accept() -> None:
            connection, _ = listener.accept()
            try:
                with server.wrap_socket(connection, server_side=True) as tls:
                    peer = tls.getpeercert() or {}
                    names = [pair for rdn in peer.get("subject", ()) for pair in rdn]
                    common = [pair[1] for pair in names if pair[0] == "commonName"]
                    seen.append(str(common[0]) if common else None)
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as exc:
                failures.append(exc)

        thread = threading.Thread(target=accept)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port)) as raw,
                client.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
            ):
                assert tls.recv(2) == b"ok"
        finally:
            thread.join(timeout=10)
    if failures:
        raise failures[0]
    return seen[0]


def test_a_client_certificate_names_its_principal_to_the_server(tmp_path: Path) -> None:
    assert _handshake(tmp_path, client_cert=True) == "worker-scaler"


def test_a_server_requiring_client_certificates_refuses_a_client_without_one(
    tmp_path: Path,
) -> None:
    with pytest.raises((ssl.SSLError, OSError)):
        _handshake(tmp_path, client_cert=False)


def test_the_authority_is_generated_once_and_keys_are_private(tmp_path: Path) -> None:
    first = ensure_authority(tmp_path / "tls")
    before = first.certificate.read_bytes()
    again = ensure_authority(tmp_path / "tls")
    assert again.certificate.read_bytes() == before
    pair = again.issue_client(tmp_path / "tls", "monitor")
    assert stat.S_IMODE(first.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pair.key.stat().st_mode) == 0o600
