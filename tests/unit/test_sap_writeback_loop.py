"""The SAP writeback's retry budget (SapRetries.writeback): a transient failure is written
again with doubling waits; a permanent one is dead-lettered; past the budget it stops."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from connectors.common.mapping import load_mapping
from connectors.sap.connector import SapConnector
from connectors.sap.exceptions import ODataError
from connectors.sap.odata import EntityRecord, EntitySource
from connectors.sap.systems import SapRetries
from connectors.sap.writeback import correlation_id
from pipeline.settings import ModelSettings, Settings
from schemas.models import InferenceResult, Outputs, ResultStatus, Tensor, TensorDatatype

MAPPING = Path(__file__).resolve().parents[2] / "connectors/sap/mappings/supplier_invoice.yaml"
PREDICATE = "(SupplierInvoice='5105600001',FiscalYear='2024')"
SECRET = b"sap-unit-secret-0123456789"


class _FailingWrites:
    """An OData system whose writes fail with ``status`` ``failures`` times, then succeed."""

    def __init__(self, source: EntitySource, status: int, failures: int) -> None:
        self.source = source
        self.status = status
        self.failures = failures
        self.writes = 0

    async def read_entity(self, predicate: str) -> EntityRecord:
        return EntityRecord({"YY1_RiskRequestId": ""}, 'W/"1"')

    async def write(self, call: Any, etag: str | None) -> Any:
        self.writes += 1
        if self.writes <= self.failures:
            raise ODataError("refused", status=self.status, transient=self.status >= 500)
        return type("Answer", (), {"headers": {"etag": 'W/"2"'}})()

    async def close(self) -> None:
        return None


def _result(request_id: uuid.UUID) -> InferenceResult:
    tensor = Tensor(
        name="score",
        datatype=TensorDatatype.FP32,
        shape=[1, 1],
        data=np.array([[0.5]], dtype="<f4").tobytes(),
    )
    return InferenceResult(
        request_id=request_id,
        status=ResultStatus.OK,
        model="invoice_risk",
        model_version="1",
        outputs=Outputs(tensors=[tensor]),
    )


def _write(
    status: int, failures: int, attempts: int, letters: list[str] | None = None
) -> tuple[_FailingWrites, SapConnector]:
    """Write one result through a writeback whose budget allows ``attempts``; the reason
    codes of its letters go to ``letters``."""
    mapping = load_mapping(MAPPING)
    odata = _FailingWrites(EntitySource.from_mapping(mapping.source), status, failures)
    budget = {"max_attempts": attempts, "base_delay_s": 0.001, "max_delay_s": 0.002}
    connector = SapConnector(
        Settings(models={"invoice_risk": ModelSettings(feature_order=("amount_eur",))}),
        mapping,
        odata,  # type: ignore[arg-type]
        secrets=(SECRET,),
        name="sap-unit",
        retries=SapRetries(writeback=budget),
    )
    written_letters = letters if letters is not None else []

    async def dead_letter(_route: Any, _payload: bytes, why: Any, **_: Any) -> None:
        written_letters.append(why.reason_code)

    connector.core.dead_letter = dead_letter  # type: ignore[method-assign]
    request_id = uuid.UUID(int=7)
    result = _result(request_id).model_copy(
        update={"correlation_id": correlation_id(connector.core.signer, PREDICATE, request_id)}
    )

    async def main() -> None:
        await connector.writeback._write_until_done(
            connector.routes[0], PREDICATE, result, asyncio.Event()
        )

    asyncio.run(main())
    return odata, connector


def test_a_transient_failure_is_written_again_within_the_budget() -> None:
    letters: list[str] = []
    odata, connector = _write(status=503, failures=2, attempts=3, letters=letters)
    assert odata.writes == 3
    assert connector.stats.written == 1
    assert letters == []


def test_a_transient_failure_past_the_budget_stops_the_writeback() -> None:
    with pytest.raises(ODataError, match="refused"):
        _write(status=503, failures=5, attempts=3)


def test_a_permanent_failure_is_dead_lettered_at_once_whatever_the_budget() -> None:
    letters: list[str] = []
    odata, connector = _write(status=404, failures=5, attempts=1_000, letters=letters)
    assert odata.writes == 1
    assert letters == ["writeback_failed_404"]
    assert connector.stats.write_failures == 1
    assert connector.stats.written == 0
