"""Pub/Sub API bookkeeping (credits, replay starts, error mapping), REST batching and error
classification, writeback values, and the JWT bearer assertion."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from connectors.common.correlation import Rejected
from connectors.salesforce.auth import (
    ClientCredentials,
    JwtBearer,
    flow_from_env,
    jwt_assertion,
    org_id_from_identity_url,
)
from connectors.salesforce.config import (
    WritebackConfig,
    correlation_id,
    record_of,
    signer,
    writeback_values,
)
from connectors.salesforce.connector import latest_per_record
from connectors.salesforce.exceptions import (
    AuthenticationError,
    ConfigurationError,
    PubSubError,
    ReplayIdRejectedError,
    RestError,
)
from connectors.salesforce.pubsub import (
    REPLAY_ERROR_CODES,
    CreditWindow,
    ReplayStart,
    error_from_rpc,
    replay_start,
)
from connectors.salesforce.rest import (
    RecordUpdate,
    Verdict,
    chunks,
    classify,
    error_code_of,
    save_outcomes,
    soql_datetime,
)
from schemas.models import InferenceResult, Outputs, ResultStatus, Tensor, TensorDatatype

# ---------------------------------------------------------------------------- flow control


def test_credits_are_topped_up_once_half_the_window_is_used() -> None:
    window = CreditWindow(100)
    assert window.open() == 100
    window.on_response(delivered=30)
    assert window.top_up() == 0
    window.on_response(delivered=30)
    assert window.top_up() == 60
    assert window.outstanding == 100


def test_a_stale_pending_count_never_inflates_the_credits() -> None:
    # The server sent 60 events (40 still owed) and then the other 40 before our top-up
    # arrived: the second response still says 0 pending, yet 60 new credits are on the way.
    window = CreditWindow(100)
    granted = window.open()
    window.on_response(delivered=60)
    granted += window.top_up()
    window.on_response(delivered=40)
    granted += window.top_up()
    assert granted - 100 == window.outstanding == 60


def test_outstanding_credits_never_exceed_the_window() -> None:
    window = CreditWindow(5, refill_at=2)
    granted, delivered_total = window.open(), 0
    for delivered in [1, 2, 1, 1, 3, 0, 2]:
        delivered = min(delivered, window.outstanding)
        delivered_total += delivered
        window.on_response(delivered)
        granted += window.top_up()
        assert 0 <= window.outstanding <= 5
        assert granted - delivered_total == window.outstanding


@pytest.mark.parametrize(("size", "refill_at"), [(0, None), (5, 5), (5, -1)])
def test_invalid_windows_are_refused(size: int, refill_at: int | None) -> None:
    with pytest.raises(ValueError, match="must be"):
        CreditWindow(size, refill_at)


def test_a_stored_replay_id_resumes_with_custom_and_none_uses_the_preset() -> None:
    assert replay_start(b"\x00\x07", "LATEST") == ReplayStart("CUSTOM", b"\x00\x07")
    assert replay_start(None, "EARLIEST") == ReplayStart("EARLIEST")
    with pytest.raises(ValueError, match="CUSTOM"):
        ReplayStart("CUSTOM")
    with pytest.raises(ValueError, match="CUSTOM"):
        ReplayStart("LATEST", b"\x01")


class _RpcFailure(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, trailers: tuple[tuple[str, str], ...]) -> None:
        self._code, self._trailers = code, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "failed rpcId: 1"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailers

    def initial_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


def test_a_rejected_replay_id_is_its_own_error_never_a_transient_one() -> None:
    for error_code in REPLAY_ERROR_CODES:
        failure = _RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, (("error-code", error_code),))
        error = error_from_rpc(failure, "Subscribe")
        assert isinstance(error, ReplayIdRejectedError)
        assert error.error_code == error_code


def test_rpc_errors_map_to_transient_or_permanent() -> None:
    unavailable = error_from_rpc(_RpcFailure(grpc.StatusCode.UNAVAILABLE, ()), "Subscribe")
    assert unavailable.transient
    expired = error_from_rpc(_RpcFailure(grpc.StatusCode.UNAUTHENTICATED, ()), "GetTopic")
    assert expired.transient
    assert expired.code == "UNAUTHENTICATED"
    denied = error_from_rpc(_RpcFailure(grpc.StatusCode.PERMISSION_DENIED, ()), "GetTopic")
    assert type(denied) is PubSubError
    assert not denied.transient


# ---------------------------------------------------------------------------- REST


@pytest.mark.parametrize(
    ("status", "code", "verdict"),
    [
        (200, None, Verdict.OK),
        (204, None, Verdict.OK),
        (403, "REQUEST_LIMIT_EXCEEDED", Verdict.RATE_LIMITED),
        (403, "INSUFFICIENT_ACCESS", Verdict.PERMANENT),
        (401, "INVALID_SESSION_ID", Verdict.SESSION_EXPIRED),
        (503, "SERVER_UNAVAILABLE", Verdict.TRANSIENT),
        (500, None, Verdict.TRANSIENT),
        (404, "ENTITY_IS_DELETED", Verdict.PERMANENT),
        (400, "INVALID_FIELD", Verdict.PERMANENT),
    ],
)
def test_salesforce_answers_are_classified(status: int, code: str | None, verdict: Verdict) -> None:
    assert classify(status, code) is verdict


def test_error_codes_are_read_from_salesforces_error_bodies() -> None:
    assert error_code_of([{"message": "x", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]) == (
        "REQUEST_LIMIT_EXCEEDED"
    )
    assert error_code_of(None) is None
    assert error_code_of("<html>") is None


def _updates(count: int) -> list[RecordUpdate]:
    return [RecordUpdate("Supplier_Invoice__c", f"a01{i:06d}", {"S__c": i}) for i in range(count)]


def test_collections_are_cut_at_200_records() -> None:
    sizes = [len(chunk) for chunk in chunks(_updates(450))]
    assert sizes == [200, 200, 50]
    with pytest.raises(ValueError, match="size"):
        list(chunks(_updates(3), 201))


def test_a_collection_item_carries_type_id_and_fields() -> None:
    assert _updates(1)[0].collection_item() == {
        "attributes": {"type": "Supplier_Invoice__c"},
        "id": "a01000000",
        "S__c": 0,
    }


def test_per_record_failures_are_paired_in_order_and_only_lock_errors_retry() -> None:
    updates = _updates(3)
    results = [
        {"id": "a01000000", "success": True, "errors": []},
        {
            "success": False,
            "errors": [{"statusCode": "ENTITY_IS_DELETED", "message": "entity is deleted"}],
        },
        {"success": False, "errors": [{"statusCode": "UNABLE_TO_LOCK_ROW", "message": "lock"}]},
    ]
    ok, deleted, locked = save_outcomes(updates, results)
    assert ok.ok
    assert ok.update is updates[0]
    assert (deleted.ok, deleted.error_code, deleted.transient) == (
        False,
        "ENTITY_IS_DELETED",
        False,
    )
    assert (locked.error_code, locked.transient) == ("UNABLE_TO_LOCK_ROW", True)


def test_a_result_count_that_does_not_match_is_not_trusted() -> None:
    with pytest.raises(RestError, match="2 results for 3") as mismatch:
        save_outcomes(_updates(3), [{"success": True}, {"success": True}])
    assert mismatch.value.transient


def test_soql_datetimes_are_utc_literals() -> None:
    assert soql_datetime(1_700_000_000_123) == "2023-11-14T22:13:20Z"


# ---------------------------------------------------------------------------- writeback


PROD = signer("prod", (b"p" * 32,))


def _result(status: ResultStatus = ResultStatus.OK, score: float = 0.25) -> InferenceResult:
    outputs = Outputs(
        tensors=[
            Tensor(
                name="score",
                datatype=TensorDatatype.FP32,
                shape=[1, 1],
                data=np.array([score], dtype="<f4").tobytes(),
            )
        ]
    )
    request_id = uuid.uuid4()
    return InferenceResult(
        request_id=request_id,
        correlation_id=correlation_id(PROD, "Supplier_Invoice__c", "a01X", request_id),
        status=status,
        error_code=None if status is ResultStatus.OK else "backend_error",
        model="invoice_risk",
        model_version="2",
        outputs=outputs if status is ResultStatus.OK else None,
    )


def test_results_name_their_record_and_only_this_connectors_count() -> None:
    result = _result()
    assert record_of(result, PROD) == ("Supplier_Invoice__c", "a01X")
    assert record_of(result, signer("staging", (b"s" * 32,))) == Rejected("not_ours")
    assert record_of(result.model_copy(update={"correlation_id": "sap:1"}), PROD) == Rejected(
        "not_ours"
    )
    for unsigned in (
        "salesforce|prod|Supplier_Invoice__c:a01X",
        "salesforce:prod:Supplier_Invoice__c:a01X",  # the form before signing
    ):
        assert record_of(result.model_copy(update={"correlation_id": unsigned}), PROD) == Rejected(
            "unsigned"
        )
    staging = "salesforce:staging:Supplier_Invoice__c:a01X"
    assert record_of(result.model_copy(update={"correlation_id": staging}), PROD) == Rejected(
        "not_ours"
    )
    copied = result.model_copy(update={"request_id": uuid.uuid4()})
    assert record_of(copied, PROD) == Rejected("other_request")
    sobject_only = correlation_id(PROD, "Supplier_Invoice__c", "", result.request_id)
    assert record_of(result.model_copy(update={"correlation_id": sobject_only}), PROD) == Rejected(
        "not_a_record"
    )


def test_writeback_values_come_from_the_result() -> None:
    config = WritebackConfig(
        fields={
            "Risk_Score__c": "tensor:score",
            "Model__c": "model_version",
            "Req__c": "request_id",
        }
    )
    result = _result(score=0.5)
    assert writeback_values(result, config) == {
        "Risk_Score__c": 0.5,
        "Model__c": "2",
        "Req__c": str(result.request_id),
    }
    assert writeback_values(_result(ResultStatus.ERROR), config) is None
    with pytest.raises(ValueError, match="none of"):
        WritebackConfig(fields={"X__c": "score"})


def test_one_update_per_record_the_latest_wins() -> None:
    first = RecordUpdate("T", "1", {"S": 1})
    other = RecordUpdate("T", "2", {"S": 2})
    again = RecordUpdate("T", "1", {"S": 3})
    assert latest_per_record([first, other, again]) == [other, again]


# ---------------------------------------------------------------------------- auth


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_the_jwt_assertion_is_rs256_with_salesforces_claims() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    token = jwt_assertion(
        client_id="3MVG9",
        username="int@example.com",
        audience="https://login.salesforce.com",
        private_key_pem=pem,
        now=1_000.0,
    )
    header, claims, signature = token.split(".")
    assert json.loads(_b64decode(header)) == {"alg": "RS256"}
    assert json.loads(_b64decode(claims)) == {
        "iss": "3MVG9",
        "sub": "int@example.com",
        "aud": "https://login.salesforce.com",
        "exp": 1_180,
    }
    key.public_key().verify(
        _b64decode(signature), f"{header}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256()
    )


def test_flows_come_from_the_environment_and_never_show_secrets(tmp_path: Any) -> None:
    base = {"SALESFORCE_LOGIN_URL": "https://login.salesforce.com/", "SALESFORCE_CLIENT_ID": "id"}
    flow = flow_from_env({**base, "SALESFORCE_CLIENT_SECRET": "hunter2"})
    assert flow == ClientCredentials("https://login.salesforce.com", "id", "hunter2")
    assert "hunter2" not in repr(flow)
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(b"-----BEGIN PRIVATE KEY-----")
    jwt = flow_from_env(
        {**base, "SALESFORCE_USERNAME": "u", "SALESFORCE_PRIVATE_KEY_FILE": str(key_file)}
    )
    assert isinstance(jwt, JwtBearer)
    assert "BEGIN" not in repr(jwt)
    with pytest.raises(ConfigurationError, match="SALESFORCE_CLIENT_SECRET"):
        flow_from_env(base)


def test_the_org_id_comes_from_the_identity_url() -> None:
    assert org_id_from_identity_url("https://login.salesforce.com/id/00DX/005Y") == "00DX"
    with pytest.raises(AuthenticationError):
        org_id_from_identity_url("https://login.salesforce.com/services")
