"""How fast the SAP webhook takes deliveries: token buckets per client address and overall.

Pure logic on a monotonic clock the caller passes in (tests pass a fake one). A refused
delivery learns how long to wait (the ``Retry-After`` of its 429).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; a delivery takes one."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    updated: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        finite = math.isfinite(self.rate) and math.isfinite(self.burst)
        if not (finite and self.rate > 0 and self.burst >= 1):
            raise ValueError(
                f"a token bucket needs a finite rate > 0 and burst >= 1 "
                f"(rate {self.rate}, burst {self.burst})"
            )
        self.tokens = self.burst

    def _refill(self, now: float) -> None:
        if self.updated is not None:
            # A clock that steps back refills nothing (and takes nothing away).
            self.tokens = min(self.burst, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now if self.updated is None else max(self.updated, now)

    def wait_s(self, now: float) -> float:
        """0 when a token is there now, else the seconds until one is."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self) -> None:
        """Take the token :meth:`wait_s` just found."""
        self.tokens -= 1

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


@dataclass
class RateLimiter:
    """A bucket per client address and one for all clients together.

    A delivery is admitted only when both have a token, and then takes one from each: a
    client refused by its own bucket costs the others nothing. At most ``max_clients``
    buckets are kept (a stranger may come from many addresses); the least recently seen is
    forgotten first, which gives that address a full bucket again, so the overall bucket is
    what bounds a crowd.
    """

    per_client_rate: float
    per_client_burst: float
    total_rate: float
    total_burst: float
    max_clients: int = 10_000
    total: TokenBucket = field(init=False)
    clients: OrderedDict[str, TokenBucket] = field(init=False, default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.total = TokenBucket(self.total_rate, self.total_burst)
        TokenBucket(self.per_client_rate, self.per_client_burst)  # refuses bad limits now

    def admit(self, client: str, now: float) -> float:
        """0 when the delivery may go on (its tokens taken), else seconds to wait."""
        bucket = self.clients.get(client)
        if bucket is None:
            bucket = TokenBucket(self.per_client_rate, self.per_client_burst)
            self.clients[client] = bucket
            while len(self.clients) > self.max_clients:
                self.clients.popitem(last=False)
        else:
            self.clients.move_to_end(client)
        wait = max(bucket.wait_s(now), self.total.wait_s(now))
        if wait > 0:
            return wait
        bucket.take()
        self.total.take()
        return 0.0


def retry_after(wait_s: float) -> str:
    """A ``Retry-After`` value (whole seconds, at least 1) for a wait."""
    return str(max(1, math.ceil(wait_s)))
