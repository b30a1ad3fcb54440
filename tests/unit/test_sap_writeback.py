"""Which results the SAP connector writes back, where, and what it writes."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest

from connectors.common.correlation import Rejected
from connectors.sap.exceptions import SapConfigError
from connectors.sap.odata import EntitySource
from connectors.sap.writeback import (
    Skip,
    WritebackCall,
    WritebackSpec,
    correlation_id,
    output_value,
    plan_writeback,
    predicate_of,
    predicate_parts,
    signer,
)
from schemas.models import InferenceResult, Outputs, ResultStatus, Tensor, TensorDatatype

V2 = EntitySource(
    service="/sap/opu/odata/sap/API_SUPPLIERINVOICE_PROCESS_SRV",
    entity_set="A_SupplierInvoice",
    keys={"SupplierInvoice": "string", "FiscalYear": "string"},
)
V4 = V2.model_copy(update={"odata_version": 4, "service": "/odata4/x", "entity_set": "Inv"})
PREDICATE = "(SupplierInvoice='5105600001',FiscalYear='2024')"
REQUEST_ID = uuid.UUID("00000000-0000-0000-0000-000000000042")
SIGNER = signer("sap", (b"k" * 32,))
PATCH = WritebackSpec(
    fields={"YY1_RiskScore": "{score:.4f}", "YY1_RiskRequestId": "{request_id}"},
    marker_field="YY1_RiskRequestId",
)


def _result(score: float | None = 0.73125, **changes: Any) -> InferenceResult:
    outputs = (
        None
        if score is None
        else Outputs(
            tensors=[
                Tensor(
                    name="score",
                    datatype=TensorDatatype.FP32,
                    shape=[1, 1],
                    data=np.array([[score]], dtype="<f4").tobytes(),
                )
            ]
        )
    )
    fields: dict[str, Any] = {
        "request_id": REQUEST_ID,
        "status": ResultStatus.OK,
        "model": "invoice_risk",
        "model_version": "1",
        "outputs": outputs,
        "correlation_id": correlation_id(SIGNER, PREDICATE, REQUEST_ID),
    }
    fields.update(changes)
    return InferenceResult(**fields)


def test_correlation_ids_name_the_connector_and_the_entity() -> None:
    result = _result()
    assert predicate_of(SIGNER, result) == PREDICATE
    other = signer("sap-other", (b"k" * 32,))
    assert predicate_of(other, result) == Rejected("not_ours")
    assert predicate_of(SIGNER, _result(correlation_id=None)) == Rejected("not_ours")
    # The old unsigned form, as an outsider would write it, is refused.
    assert predicate_of(SIGNER, _result(correlation_id=f"sap|sap|{PREDICATE}")) == Rejected(
        "unsigned"
    )
    not_a_predicate = correlation_id(SIGNER, "not-a-predicate", REQUEST_ID)
    assert predicate_of(SIGNER, _result(correlation_id=not_a_predicate)) == Rejected(
        "not_a_predicate"
    )


def test_a_signed_correlation_id_copied_onto_another_request_is_refused() -> None:
    copied = _result(request_id=uuid.uuid4())
    assert predicate_of(SIGNER, copied) == Rejected("other_request")


def test_v2_updates_merge_with_the_rendered_fields() -> None:
    call = plan_writeback(_result(), predicate=PREDICATE, source=V2, spec=PATCH)
    assert call == WritebackCall(
        method="MERGE",
        path=f"/sap/opu/odata/sap/API_SUPPLIERINVOICE_PROCESS_SRV/A_SupplierInvoice{PREDICATE}",
        body={"YY1_RiskScore": "0.7312", "YY1_RiskRequestId": str(REQUEST_ID)},
        entity_path=f"/sap/opu/odata/sap/API_SUPPLIERINVOICE_PROCESS_SRV/A_SupplierInvoice{PREDICATE}",
        marker=("YY1_RiskRequestId", str(REQUEST_ID)),
    )


def test_v4_updates_patch() -> None:
    call = plan_writeback(_result(), predicate=PREDICATE, source=V4, spec=PATCH)
    assert isinstance(call, WritebackCall)
    assert (call.method, call.path) == ("PATCH", f"/odata4/x/Inv{PREDICATE}")


def test_v2_function_imports_take_keys_and_parameters_in_the_url() -> None:
    spec = WritebackSpec(method="action", action="Release", parameters={"Note": "risk {score:.2f}"})
    call = plan_writeback(_result(), predicate=PREDICATE, source=V2, spec=spec)
    assert isinstance(call, WritebackCall)
    assert call.method == "POST"
    assert call.body is None
    assert call.path == (
        "/sap/opu/odata/sap/API_SUPPLIERINVOICE_PROCESS_SRV/Release"
        "?SupplierInvoice='5105600001'&FiscalYear='2024'&Note='risk%200.73'"
    )


def test_v4_bound_actions_post_a_json_body() -> None:
    spec = WritebackSpec(
        method="action", action="SAP__self.Release", parameters={"Score": "{score}"}
    )
    call = plan_writeback(_result(0.5), predicate=PREDICATE, source=V4, spec=spec)
    assert isinstance(call, WritebackCall)
    assert call.path == f"/odata4/x/Inv{PREDICATE}/SAP__self.Release"
    assert call.body == {"Score": "0.5"}


def test_results_without_a_score_are_skipped_with_a_reason() -> None:
    failed = _result(None, status=ResultStatus.ERROR, error_code="backend_error")
    assert plan_writeback(failed, predicate=PREDICATE, source=V2, spec=PATCH) == Skip(
        "status_error"
    )
    assert plan_writeback(_result(None), predicate=PREDICATE, source=V2, spec=PATCH) == Skip(
        "no_output"
    )
    assert output_value(_result(0.25), "score") == 0.25
    assert output_value(_result(0.25), "other") is None


def test_key_predicates_split_outside_quotes() -> None:
    assert predicate_parts("(A='x,y',B='it''s',C=3)") == ["A='x,y'", "B='it''s'", "C=3"]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"method": "patch"}, "needs fields"),
        ({"method": "action"}, "action's name"),
        ({"fields": {"A": "{score}"}, "marker_field": "B"}, "marker_field"),
        ({"method": "put", "fields": {"A": "x"}}, "method"),
    ],
)
def test_invalid_writeback_sections_say_why(section: dict[str, Any], message: str) -> None:
    with pytest.raises(SapConfigError, match=message):
        WritebackSpec.from_mapping(section)


def test_function_import_parameters_follow_the_v2_uri_literal_rules() -> None:
    spec = WritebackSpec.from_mapping(
        {
            "method": "action",
            "action": "Release",
            "parameters": {
                "Note": "it's {score:.2f}",
                "Approved": {"value": "true", "type": "Edm.Boolean"},
                "Blocked": {"value": "", "type": "Edm.Boolean"},
                "RiskScore": {"value": "{score:.4f}", "type": "Edm.Decimal"},
                "Level": {"value": "3", "type": "Edm.Int32"},
                "Big": {"value": "3", "type": "Edm.Int64"},
                "Ratio": {"value": "{score}", "type": "Edm.Double"},
            },
        }
    )
    call = plan_writeback(_result(0.25), predicate=PREDICATE, source=V2, spec=spec)
    assert isinstance(call, WritebackCall)
    assert call.path.split("?", 1)[1].split("&")[2:] == [
        "Note='it''s%200.25'",
        "Approved=true",
        "Blocked=false",
        "RiskScore=0.2500M",
        "Level=3",
        "Big=3L",
        "Ratio=0.25d",
    ]


def test_v4_action_parameters_are_json_typed() -> None:
    spec = WritebackSpec.from_mapping(
        {
            "method": "action",
            "action": "SAP__self.Release",
            "parameters": {
                "Note": "n",
                "Approved": {"value": "X", "type": "Edm.Boolean"},
                "Score": {"value": "{score}", "type": "Edm.Decimal"},
                "Level": {"value": "7", "type": "Edm.Int32"},
            },
        }
    )
    call = plan_writeback(_result(0.5), predicate=PREDICATE, source=V4, spec=spec)
    assert isinstance(call, WritebackCall)
    assert call.body == {"Note": "n", "Approved": True, "Score": 0.5, "Level": 7}


@pytest.mark.parametrize(
    ("value", "kind"),
    [("yes", "Edm.Boolean"), ("0.5", "Edm.Int32"), ("nan", "Edm.Decimal"), ("x", "Edm.Guid")],
)
def test_a_parameter_that_is_no_value_of_its_type_is_never_sent(value: str, kind: str) -> None:
    spec = WritebackSpec.from_mapping(
        {
            "method": "action",
            "action": "Release",
            "parameters": {"P": {"value": value, "type": kind}},
        }
    )
    for source in (V2, V4):
        assert plan_writeback(_result(), predicate=PREDICATE, source=source, spec=spec) == Skip(
            "invalid_parameter"
        )


def test_a_conditional_writeback_writes_only_when_the_output_meets_it() -> None:
    spec = WritebackSpec.from_mapping(
        {"method": "action", "action": "Release", "only_if": {"below": 0.3}}
    )
    assert isinstance(
        plan_writeback(_result(0.29), predicate=PREDICATE, source=V2, spec=spec), WritebackCall
    )
    for score in (0.3, 0.9):
        assert plan_writeback(_result(score), predicate=PREDICATE, source=V2, spec=spec) == Skip(
            "condition_not_met"
        )
    band = WritebackSpec.from_mapping(
        {"fields": {"A": "{score}"}, "only_if": {"at_least": 0.5, "below": 0.8}}
    )
    outcomes = [
        isinstance(plan_writeback(_result(s), predicate=PREDICATE, source=V2, spec=band), Skip)
        for s in (0.49, 0.5, 0.79, 0.8)
    ]
    assert outcomes == [True, False, False, True]
    with pytest.raises(SapConfigError, match="only_if"):
        WritebackSpec.from_mapping({"fields": {"A": "x"}, "only_if": {}})
