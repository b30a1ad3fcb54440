"""Signed correlation ids: only what this connector signed, for this request, verifies."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from connectors.common.correlation import (
    ENV_VARIABLE,
    MAX_CORRELATION_CHARS,
    CorrelationSigner,
    MissingSecretError,
    Rejected,
    Verified,
    secret_env_name,
    secrets_from_env,
)
from connectors.salesforce.exceptions import ConfigurationError
from connectors.salesforce.runner import ConnectorOptions, SalesforceConnector
from devkit.settings import DEMO_SETTINGS_FILE, load_demo_settings
from schemas.errors import UnservableRecord
from sluiceway import main as cli_main

SECRET = b"s" * 32
OLD_SECRET = b"o" * 32
REQUEST = uuid.UUID("6f1c2a9e-8d3b-4f4a-9c61-0a1b2c3d4e5f")
OTHER_REQUEST = uuid.UUID("00000000-0000-0000-0000-000000000001")
SUBJECT = "(SupplierInvoice='5105600001',FiscalYear='2024')"


def _signer(connector: str = "sap", *secrets: bytes) -> CorrelationSigner:
    return CorrelationSigner("sap", connector, secrets or (SECRET,))


def test_a_signed_id_verifies_for_its_request_and_names_its_subject() -> None:
    signer = _signer()
    correlation = signer.sign(SUBJECT, REQUEST)
    assert correlation.startswith(f"sap|sap|{SUBJECT}|{REQUEST}|")
    assert len(correlation) <= MAX_CORRELATION_CHARS
    assert signer.verify(correlation, REQUEST) == Verified(SUBJECT)
    assert signer.verify(correlation, str(REQUEST)) == Verified(SUBJECT)
    # Deterministic: a restarted connector (same secret) signs and verifies the same way.
    assert _signer().sign(SUBJECT, REQUEST) == correlation
    assert _signer().verify(correlation, REQUEST) == Verified(SUBJECT)


def test_a_copied_id_on_another_request_is_refused() -> None:
    correlation = _signer().sign(SUBJECT, REQUEST)
    assert _signer().verify(correlation, OTHER_REQUEST) == Rejected("other_request")


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        # Another record, keeping the signature.
        (lambda c: c.replace("5105600001", "5105600002"), "bad_signature"),
        # Another request id inside the id (and the result's request id to match it).
        (lambda c: c.replace(str(REQUEST), str(OTHER_REQUEST)), "bad_signature"),
        # One character of the MAC changed.
        (lambda c: c[:-1] + ("A" if c[-1] != "A" else "B"), "bad_signature"),
        # The MAC cut short, missing, or replaced by nothing.
        (lambda c: c[:-1], "unsigned"),
        (lambda c: c.rpartition("|")[0], "unsigned"),
        (lambda c: c.rpartition("|")[0] + "|", "unsigned"),
        # The subject and request id removed, the MAC kept.
        (lambda c: "sap|sap|" + c.rpartition("|")[2], "malformed"),
        # Truncated to the connector's head only, or to nothing.
        (lambda c: "sap|sap|", "unsigned"),
        (lambda c: "", "not_ours"),
    ],
)
def test_tampered_ids_are_refused(tamper: object, reason: str) -> None:
    signer = _signer()
    correlation = signer.sign(SUBJECT, REQUEST)
    assert callable(tamper)
    forged = tamper(correlation)
    request = OTHER_REQUEST if str(OTHER_REQUEST) in forged else REQUEST
    assert signer.verify(forged, request) == Rejected(reason)


def test_another_connectors_id_is_not_ours_even_with_the_same_secret() -> None:
    theirs = _signer("sap-b").sign(SUBJECT, REQUEST)
    assert _signer("sap").verify(theirs, REQUEST) == Rejected("not_ours")
    # Renaming the connector inside the id breaks the signature.
    moved = theirs.replace("sap|sap-b|", "sap|sap|", 1)
    assert _signer("sap").verify(moved, REQUEST) == Rejected("bad_signature")
    # A connector whose name extends ours is not ours either.
    assert _signer("sa").verify(theirs, REQUEST) == Rejected("not_ours")


def test_the_wrong_secret_does_not_verify() -> None:
    correlation = _signer("sap", b"x" * 32).sign(SUBJECT, REQUEST)
    assert _signer().verify(correlation, REQUEST) == Rejected("bad_signature")


def test_a_rotated_secret_keeps_verifying_until_it_is_dropped() -> None:
    signed_before = _signer("sap", OLD_SECRET).sign(SUBJECT, REQUEST)
    rotating = _signer("sap", SECRET, OLD_SECRET)
    assert rotating.verify(signed_before, REQUEST) == Verified(SUBJECT)
    signed_after = rotating.sign(SUBJECT, REQUEST)
    assert signed_after == _signer("sap", SECRET).sign(SUBJECT, REQUEST), "the first one signs"
    assert _signer("sap", SECRET).verify(signed_before, REQUEST) == Rejected("bad_signature")


def test_subjects_with_separators_and_unicode_round_trip() -> None:
    signer = _signer()
    for subject in ("(Key='a|b|c')", "(Name='Müller ☃ \U0001d518 🙂')", "|", "(K='x'')|y')"):
        assert signer.verify(signer.sign(subject, REQUEST), REQUEST) == Verified(subject)


def test_hostile_correlation_ids_never_verify_nor_raise() -> None:
    signer = _signer()
    valid = signer.sign(SUBJECT, REQUEST)
    mac = valid.rpartition("|")[2]
    hostile = [
        None,
        "",
        "|",
        "sap|sap",
        "sap|sap|||",
        f"sap|sap|{SUBJECT}",  # the old unsigned form
        f"sap|sap|{SUBJECT}|{REQUEST}",
        f"sap|sap|{SUBJECT}|{REQUEST}|{'A' * 43}",
        f"sap|sap|{SUBJECT}|not-a-uuid|{mac}",
        f"sap|sap|{SUBJECT}|{REQUEST}|{mac}|{mac}",
        "sap|sap|" + "x" * 100_000 + f"|{REQUEST}|{mac}",  # huge
        f"sap|sap|\ud800|{REQUEST}|{mac}",  # a lone surrogate
        "sap|sap|(Ünïcode)|\u2028|" + "é" * 43,
        valid.upper(),
        valid + " ",
        " " + valid,
    ]
    for correlation in hostile:
        assert isinstance(signer.verify(correlation, REQUEST), Rejected), correlation


def test_subjects_that_cannot_be_signed_are_unmappable() -> None:
    with pytest.raises(UnservableRecord) as too_long:
        _signer().sign("(" + "x" * MAX_CORRELATION_CHARS + ")", REQUEST)
    assert too_long.value.reason_code == "subject_too_long"
    with pytest.raises(UnservableRecord) as empty:
        _signer().sign("", REQUEST)
    assert empty.value.reason_code == "invalid_subject"
    with pytest.raises(ValueError, match="badly formed"):
        _signer().sign(SUBJECT, "not-a-uuid")


def test_signers_refuse_bad_names_and_missing_secrets() -> None:
    with pytest.raises(ValueError, match="connector"):
        CorrelationSigner("sap", "a|b", (SECRET,))
    with pytest.raises(ValueError, match="connector"):
        CorrelationSigner("sap", "", (SECRET,))
    with pytest.raises(MissingSecretError):
        CorrelationSigner("sap", "sap", ())
    with pytest.raises(MissingSecretError):
        CorrelationSigner("sap", "sap", (b"",))


def test_secrets_come_from_the_environment_and_a_missing_one_stops_the_connector() -> None:
    good, old = "a" * 32, "b" * 40
    assert secrets_from_env({ENV_VARIABLE: f"{good}, {old}"}, "sap") == (
        good.encode(),
        old.encode(),
    )
    specific = secret_env_name("sap-eu.1")
    assert specific == "SLUICEWAY_CONNECTOR_SECRET_SAP_EU_1"
    assert secrets_from_env({ENV_VARIABLE: good, specific: old}, "sap-eu.1") == (old.encode(),)
    for environ in ({}, {ENV_VARIABLE: ""}, {ENV_VARIABLE: " , ,"}):
        with pytest.raises(MissingSecretError, match=ENV_VARIABLE):
            secrets_from_env(environ, "sap")
    with pytest.raises(MissingSecretError, match="shorter"):
        secrets_from_env({ENV_VARIABLE: f"{good},short"}, "sap")
    # The message names the variables, never a secret's value.
    with pytest.raises(MissingSecretError) as short:
        secrets_from_env({ENV_VARIABLE: "tiny-secret-value"}, "sap")
    assert "tiny-secret-value" not in str(short.value)


def test_the_connectors_refuse_to_start_without_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [n for n in os.environ if n.startswith(ENV_VARIABLE)]:
        monkeypatch.delenv(name)
    # Salesforce: refused before anything is opened (no mapping read, no broker contacted).
    options = ConnectorOptions(mapping=tmp_path / "never-read.yaml", name="prod")
    with pytest.raises(ConfigurationError, match=ENV_VARIABLE):
        SalesforceConnector(load_demo_settings(), options, {"SALESFORCE_CLIENT_SECRET": "x" * 40})
    with pytest.raises(ConfigurationError, match="shorter"):
        SalesforceConnector(load_demo_settings(), options, {ENV_VARIABLE: "too-short"})
    # SAP: the command ends with an error naming the variable, before it listens.
    mapping = Path(__file__).resolve().parents[2] / "connectors/sap/mappings/supplier_invoice.yaml"
    command = ["--config", str(DEMO_SETTINGS_FILE), "connect-sap", "--mapping", str(mapping)]
    command += ["--base-url", "http://127.0.0.1:9"]
    code = cli_main([*command, "--auth", "none", "--listen", "off", "--poll-interval", "30"])
    assert code == 2
    assert f"{ENV_VARIABLE}_SAP" in capsys.readouterr().err
