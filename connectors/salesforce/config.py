"""The Salesforce parts of a mapping file: ``source`` (where events come from) and
``writeback`` (which fields a result fills), plus the pure helpers that use them.

Example (``connectors/salesforce/mappings/supplier_invoice_risk.yaml``)::

    source:
      topic: /data/Supplier_Invoice__ChangeEvent
      replay_preset: EARLIEST        # where to start when no checkpoint exists
      batch_size: 100                # num_requested credits per window
      integration_users: [005...]    # commitUser ids whose changes are the connector's own
      null_values: {Payment_Terms_Days__c: -1}   # what a null field means to the model
    writeback:
      fields:
        Risk_Score__c: tensor:score            # first value of the output tensor "score"
        Risk_Model_Version__c: model_version
      marker_field: Risk_Request_Id__c         # optional: skip results already written
"""

from __future__ import annotations

import re
from typing import Any, Literal
from uuid import UUID

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import SettingsConfigDict

from connectors.common.correlation import CorrelationSigner, Rejected, Verified
from connectors.common.mapping import Mapping
from connectors.common.retries import (
    UNBOUNDED_ATTEMPTS,
    UNBOUNDED_ELAPSED_S,
    RetryBudget,
    RetrySettings,
)
from connectors.salesforce.exceptions import ConfigurationError
from schemas.models import InferenceResult, ResultStatus, TensorDatatype

_SOURCES = re.compile(r"^(tensor:[A-Za-z0-9_.-]+|text|model_version|request_id)$")
_NUMPY = {TensorDatatype.FP32: "<f4", TensorDatatype.FP64: "<f8", TensorDatatype.INT64: "<i8"}
CORRELATION_PREFIX = "salesforce"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Section):
    topic: str = Field(pattern=r"^/(data|event)/[A-Za-z0-9_]+$")
    replay_preset: Literal["LATEST", "EARLIEST"] = "LATEST"
    batch_size: int = Field(default=100, ge=1, le=1000)
    integration_users: tuple[str, ...] = ()
    null_values: dict[str, float | int | str | bool] = Field(default_factory=dict)
    """Field -> the value the model receives when the field is null (named in
    ``nulledFields``, absent from a create, null in REST). A null field without an entry
    reaches the mapping as missing: its feature's ``default`` applies, and a feature without
    one dead-letters the record. A mapping can also read ``<Field>__IsNull`` (true/false)."""


class WritebackConfig(_Section):
    fields: dict[str, str] = Field(min_length=1)
    """Salesforce field -> what fills it: ``tensor:<output>``, ``text``, ``model_version``,
    ``request_id``."""
    marker_field: str | None = Field(default=None, pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    """A text field that receives the result's request id with every write. Before writing,
    the connector reads it and skips records that already hold the id: a result delivered
    again (a crash between the write and the offset commit) is not written twice."""

    @field_validator("fields")
    @classmethod
    def _known_sources(cls, value: dict[str, str]) -> dict[str, str]:
        for name, source in value.items():
            if not _SOURCES.match(source):
                raise ValueError(
                    f"{name}: {source!r} is none of tensor:<name>, text, model_version, request_id"
                )
        return value


class SalesforceRetries(RetrySettings):
    """The connector's retry budgets; each one from the environment, e.g.
    ``SLUICEWAY_SALESFORCE_RETRIES_REST__MAX_ATTEMPTS=4`` (docs/connectors.md)."""

    model_config = SettingsConfigDict(env_prefix="SLUICEWAY_SALESFORCE_RETRIES_")

    resubscribe: RetryBudget = RetryBudget(
        max_attempts=10, base_delay_s=0.5, max_delay_s=30.0, max_elapsed_s=600.0
    )
    """A broken Pub/Sub stream (or a broker that did not ack) is resubscribed after the
    checkpoint; past this budget the ingest stops with the error."""
    writeback: RetryBudget = RetryBudget(
        max_attempts=UNBOUNDED_ATTEMPTS,
        base_delay_s=0.5,
        max_delay_s=30.0,
        max_elapsed_s=UNBOUNDED_ELAPSED_S,
    )
    """A batch of results that met a transient REST failure is read again after a wait: the
    partition holds until Salesforce takes it, so no score is skipped."""
    rest: RetryBudget = RetryBudget(
        max_attempts=8, base_delay_s=0.2, max_delay_s=10.0, max_elapsed_s=120.0
    )
    """One REST call (5xx, ``UNABLE_TO_LOCK_ROW`` records) before it fails as transient."""


def salesforce_sections(mapping: Mapping) -> tuple[SourceConfig, WritebackConfig | None]:
    """The validated ``source`` and (optional) ``writeback`` sections of a mapping."""
    try:
        source = SourceConfig.model_validate(mapping.source)
        writeback = WritebackConfig.model_validate(mapping.writeback) if mapping.writeback else None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigurationError(f"mapping: {where}: {first['msg']}") from None
    return source, writeback


NULL_FLAG_SUFFIX = "__IsNull"
"""``<Field>__IsNull``: a virtual field a mapping may read, true when ``<Field>`` is null."""


def input_fields(mapping: Mapping) -> tuple[str, ...]:
    """The Salesforce fields the mapping reads (dotted compound paths as CDC flattens them;
    a ``__IsNull`` flag reads the field it flags)."""
    names: list[str] = []
    for spec in mapping.spec.features.values():
        names.append(spec.path.replace("/", ".").removesuffix(NULL_FLAG_SUFFIX))
        if spec.transform is not None and spec.transform.plus_days_path:
            names.append(spec.transform.plus_days_path.replace("/", "."))
    return tuple(dict.fromkeys(names))


def entity_values(
    values: dict[str, Any], fields: tuple[str, ...], null_values: dict[str, Any]
) -> dict[str, Any]:
    """The record as the mapping reads it: every input field's null flag added, null fields
    given their configured ``null_values``, and ``Parent.Child`` keys nested so a mapping
    path ``BillingAddress.City`` finds the value from CDC and from REST alike."""
    flat = dict(values)
    for name in fields:
        is_null = flat.get(name) is None
        flat[f"{name}{NULL_FLAG_SUFFIX}"] = is_null
        if is_null and name in null_values:
            flat[name] = null_values[name]
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        parent, separator, child = name.partition(".")
        if separator:
            branch = nested.setdefault(parent, {})
            if isinstance(branch, dict):
                branch[child] = value
        else:
            nested[name] = value
    return nested


def signer(connector: str, secrets: tuple[bytes, ...]) -> CorrelationSigner:
    """The signer of this connector's correlation ids."""
    return CorrelationSigner(CORRELATION_PREFIX, connector, secrets)


def correlation_id(
    signer: CorrelationSigner, sobject: str, record_id: str, request_id: UUID | str
) -> str:
    """Carried by the request and echoed by its result: which record the result is for,
    signed for this request (``salesforce|<connector>|<sobject>:<record id>|<request>|<mac>``)."""
    return signer.sign(f"{sobject}:{record_id}", request_id)


def record_of(result: InferenceResult, signer: CorrelationSigner) -> tuple[str, str] | Rejected:
    """``(sobject, record id)`` of a result this connector asked for, else why not:
    ``not_ours`` (another connector's or a plain request's) or a forgery's reason."""
    checked = signer.verify(result.correlation_id, result.request_id)
    legacy = f"{CORRELATION_PREFIX}:{signer.connector}:"
    if checked == Rejected("not_ours") and (result.correlation_id or "").startswith(legacy):
        # The unsigned form of connectors before signing: this connector's name, no proof.
        return Rejected("unsigned")
    if isinstance(checked, Rejected):
        return checked
    assert isinstance(checked, Verified)
    sobject, separator, record_id = checked.subject.partition(":")
    if not separator or not sobject or not record_id or ":" in record_id:
        return Rejected("not_a_record")
    return sobject, record_id


def writeback_values(result: InferenceResult, config: WritebackConfig) -> dict[str, Any] | None:
    """The field values a result writes, or ``None`` for a result that is not ``ok`` (nothing
    is written over the record's last good score)."""
    if result.status is not ResultStatus.OK or result.outputs is None:
        return None
    values: dict[str, Any] = {}
    for name, source in config.fields.items():
        if source == "model_version":
            values[name] = result.model_version
        elif source == "request_id":
            values[name] = str(result.request_id)
        elif source == "text":
            values[name] = result.outputs.text.text if result.outputs.text else None
        else:
            values[name] = _first_value(result, source.removeprefix("tensor:"))
    if config.marker_field is not None:
        values[config.marker_field] = str(result.request_id)
    return values


def _first_value(result: InferenceResult, tensor_name: str) -> float | None:
    assert result.outputs is not None
    for tensor in result.outputs.tensors or ():
        if tensor.name == tensor_name and tensor.datatype in _NUMPY:
            data = np.frombuffer(tensor.data, dtype=_NUMPY[tensor.datatype])
            return float(data[0]) if data.size else None
    return None
