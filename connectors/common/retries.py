"""Retry budgets of the connectors, as settings: validated when they load, turned into a
:class:`~pipeline.resilience.retry.RetryPolicy` where a loop or client retries.

Each connector names its budgets in its own settings class (``SalesforceRetries``,
``SapRetries``), read from ``SLUICEWAY_<CONNECTOR>_RETRIES_<BUDGET>__<FIELD>`` environment
variables, with the defaults the connectors always had.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.resilience.retry import RetryPolicy

UNBOUNDED_ATTEMPTS = 1_000_000
"""A budget that never gives up (a writeback that holds its partition until it succeeds)."""
UNBOUNDED_ELAPSED_S = 1e9


class RetryBudget(BaseModel):
    """How often and how long one kind of failure is tried again (exponential backoff with
    full jitter, :class:`RetryPolicy`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(ge=1)
    """Attempts in all, the first included."""
    base_delay_s: float = Field(gt=0)
    """The cap of the first wait; each further wait's cap doubles."""
    max_delay_s: float = Field(gt=0)
    """No wait's cap grows past this."""
    max_elapsed_s: float = Field(gt=0)
    """No retry starts after this long since the first failure."""

    @model_validator(mode="after")
    def _ordered(self) -> RetryBudget:
        if self.max_delay_s < self.base_delay_s:
            raise ValueError(
                f"max_delay_s ({self.max_delay_s:g}) is below base_delay_s ({self.base_delay_s:g})"
            )
        return self

    def policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            base_delay_s=self.base_delay_s,
            max_delay_s=self.max_delay_s,
            max_elapsed_s=self.max_elapsed_s,
        )


class RetrySettings(BaseSettings):
    """Base of a connector's budgets: a budget given in part (one variable, say
    ``..._ODATA__MAX_ATTEMPTS``) keeps its other fields' defaults instead of losing them.
    A subclass names only its ``env_prefix``."""

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _complete(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        completed = dict(data)
        for name, given in data.items():
            field = cls.model_fields.get(name)
            default = field.default if field is not None else None
            if isinstance(given, dict) and isinstance(default, RetryBudget):
                completed[name] = {**default.model_dump(), **given}
        return completed
