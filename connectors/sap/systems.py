"""The connector config file: the SAP systems one connector serves and the mappings it runs.

``sluiceway connect-sap --connector-config connector.yaml``::

    systems:
      - name: S4H                         # the system's name (routes, logs)
        base_url: https://s4h.example.com
        auth: basic                       # basic | oauth | none
        credentials_env: SAP_S4H          # SAP_S4H_USERNAME / SAP_S4H_PASSWORD, or
                                          # SAP_S4H_CLIENT_ID / SAP_S4H_CLIENT_SECRET (oauth)
        token_url: https://.../oauth/token   # oauth only
        event_sources: [/default/sap.s4.beh/S4HCLNT100]   # CloudEvents source of its events
      - name: S4P
        ...
    mappings:
      - {file: supplier_invoice.yaml, system: S4H}   # paths relative to this file
      - {file: supplier_invoice_s4p.yaml, system: S4P}

Each mapping is read and written back through its system's base URL and credentials; an
event goes to the mapping whose system lists the event's ``source`` and whose
``source.event_types`` lists its type (:mod:`connectors.sap.routing`). Two systems must not
share an event source (an event would be ambiguous), and two mappings of one system must not
share an event type. ``--mapping FILE --base-url URL`` is the one-system, one-mapping form of
the same thing, with credentials in ``SAP_USERNAME``/``SAP_PASSWORD`` (or ``SAP_CLIENT_*``).
Parsing is pure; secrets are read from the environment by the caller, never from the file.

The retry budgets (:class:`SapRetries`) are settings of the connector process, read from
``SLUICEWAY_SAP_RETRIES_<BUDGET>__<FIELD>`` environment variables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import SettingsConfigDict

from connectors.common.retries import (
    UNBOUNDED_ATTEMPTS,
    UNBOUNDED_ELAPSED_S,
    RetryBudget,
    RetrySettings,
)
from connectors.sap.exceptions import SapConfigError


class SapRetries(RetrySettings):
    """The connector's retry budgets; each one from the environment, e.g.
    ``SLUICEWAY_SAP_RETRIES_ODATA__MAX_ATTEMPTS=3`` (docs/connectors.md)."""

    model_config = SettingsConfigDict(env_prefix="SLUICEWAY_SAP_RETRIES_")

    odata: RetryBudget = RetryBudget(
        max_attempts=6, base_delay_s=0.2, max_delay_s=5.0, max_elapsed_s=60.0
    )
    """One OData call answered 429/502/503/504 or lost in transport (never sooner than the
    server's ``Retry-After``); past it the call fails as transient (503 to the sender, the
    next poll, or a writeback retry)."""
    writeback: RetryBudget = RetryBudget(
        max_attempts=UNBOUNDED_ATTEMPTS,
        base_delay_s=1.0,
        max_delay_s=30.0,
        max_elapsed_s=UNBOUNDED_ELAPSED_S,
    )
    """A result whose write failed transiently is written again after the budget's doubling
    wait (no jitter: one entity's results wait in order); the partition holds meanwhile."""


class SystemConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    base_url: str = Field(min_length=1)
    auth: Literal["basic", "oauth", "none"] = "basic"
    credentials_env: str = Field(default="SAP", pattern=r"^[A-Z][A-Z0-9_]*$")
    token_url: str | None = None
    event_sources: tuple[str, ...] = ()

    def credential_variables(self) -> dict[str, str]:
        """Names of the environment variables that hold this system's secrets."""
        prefix = self.credentials_env
        return {
            "username_var": f"{prefix}_USERNAME",
            "password_var": f"{prefix}_PASSWORD",
            "client_id_var": f"{prefix}_CLIENT_ID",
            "client_secret_var": f"{prefix}_CLIENT_SECRET",
        }


class MappingRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: Path
    system: str


class ConnectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    systems: tuple[SystemConfig, ...] = Field(min_length=1)
    mappings: tuple[MappingRef, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> ConnectorConfig:
        names = [system.name for system in self.systems]
        if len(set(names)) != len(names):
            raise ValueError(f"system names repeat: {names}")
        owners: dict[str, str] = {}
        for system in self.systems:
            for source in system.event_sources:
                if source in owners:
                    raise ValueError(
                        f"event source {source!r} belongs to both {owners[source]} and "
                        f"{system.name}: its events could not be routed"
                    )
                owners[source] = system.name
        if len(self.systems) > 1 and any(not s.event_sources for s in self.systems):
            raise ValueError("with several systems, each needs its event_sources")
        for ref in self.mappings:
            if ref.system not in names:
                raise ValueError(f"mapping {ref.file} names unknown system {ref.system!r}")
        return self

    def system(self, name: str) -> SystemConfig:
        return next(system for system in self.systems if system.name == name)


def parse_connector_config(data: Any, *, base: Path, origin: str) -> ConnectorConfig:
    """The validated config; mapping paths resolved against ``base``."""
    try:
        config = ConnectorConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(file)"
        raise SapConfigError(f"{origin}: {where}: {first['msg']}") from None
    resolved = tuple(
        ref.model_copy(update={"file": ref.file if ref.file.is_absolute() else base / ref.file})
        for ref in config.mappings
    )
    return config.model_copy(update={"mappings": resolved})


def load_connector_config(path: Path) -> ConnectorConfig:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SapConfigError(f"connector config {path}: cannot be read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SapConfigError(f"connector config {path}: invalid YAML ({exc})") from None
    return parse_connector_config(data, base=path.parent, origin=f"connector config {path}")


def single_system(base_url: str, auth: str, token_url: str | None) -> SystemConfig:
    """The system of ``--mapping``/``--base-url``: any event source, ``SAP_*`` secrets."""
    return SystemConfig.model_validate(
        {"name": "default", "base_url": base_url, "auth": auth, "token_url": token_url}
    )
