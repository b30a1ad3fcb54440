"""Retries and circuit breakers: pure policy objects driven by an injected clock."""

from pipeline.resilience.breaker import BreakerConfig, BreakerState, CircuitBreaker
from pipeline.resilience.retry import RetryPolicy

__all__ = ["BreakerConfig", "BreakerState", "CircuitBreaker", "RetryPolicy"]
