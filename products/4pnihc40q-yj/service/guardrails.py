"""The API tier's own guardrails, as pure state machines (standard library only; the clock is
injected so the tests drive them without sleeping).

- `RateLimiter`: a token bucket per client (`burst` requests at once, refilled at `rate` per
  second). `take(client)` answers 0.0 when the request may pass, else the seconds until the
  client's next token (the API answers 429 with `Retry-After: ceil(that)`). At most
  `max_clients` buckets are kept; the least recently seen is dropped first (it comes back
  full, which is what an idle client's bucket would be anyway).
- `CircuitBreaker`: closed -> open after `failure_threshold` consecutive failures; open: every
  call is refused (fail fast) for `open_seconds`; then half-open: exactly one call (the probe)
  goes through, its success closes the breaker, its failure opens it again.

Both can be switched off (`enabled=False`, the release knob `guardrails_off`): then every
request passes and the breaker never opens.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Clock = Callable[[], float]
BreakerState = Literal["closed", "open", "half_open"]


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        enabled: bool = True,
        max_clients: int = 10_000,
        clock: Clock = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("rate must be > 0, burst and max_clients >= 1")
        self.rate = rate
        self.burst = burst
        self.enabled = enabled
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """0.0 if `client` may send this request (a token is taken), else seconds to wait."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(client)
            if bucket is None:
                bucket = self._buckets[client] = _Bucket(float(self.burst), now)
                while len(self._buckets) > self.max_clients:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(client)
                elapsed = max(0.0, now - bucket.updated)
                bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
                bucket.updated = now
            if bucket.tokens >= 1.0 - 1e-9:  # float refill: 0.1 s * 10/s is a whole token
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate

    def clients(self) -> int:
        return len(self._buckets)


def retry_after_seconds(wait: float) -> int:
    """`Retry-After` is whole seconds: at least 1, never earlier than the next token."""
    return max(1, math.ceil(wait))


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int,
        open_seconds: float,
        *,
        enabled: bool = True,
        clock: Clock = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or open_seconds <= 0:
            raise ValueError("failure_threshold must be >= 1 and open_seconds > 0")
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self.enabled = enabled
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0  # consecutive
        self._opened_at = 0.0
        self._probe_out = False
        self._lock = threading.Lock()

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose period has passed reports half_open)."""
        with self._lock:
            self._advance()
            return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        with self._lock:
            self._advance()
            if self._state != "open":
                return 0.0
            return max(0.0, self._opened_at + self.open_seconds - self._clock())

    def allow(self) -> bool:
        """May a call go through now? In half-open only one call (the probe) is let through
        until it reports; every caller that gets True must call `succeeded`, `failed` or
        `abandoned` exactly once."""
        if not self.enabled:
            return True
        with self._lock:
            self._advance()
            if self._state == "closed":
                return True
            if self._state == "half_open" and not self._probe_out:
                self._probe_out = True
                return True
            return False

    def succeeded(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._state, self._failures, self._probe_out = "closed", 0, False

    def failed(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._failures += 1
            if self._state == "half_open" or (
                self._state == "closed" and self._failures >= self.failure_threshold
            ):
                self._state, self._opened_at = "open", self._clock()
            self._probe_out = False

    def abandoned(self) -> None:
        """A call let through ended without a verdict (cancelled): free the probe slot."""
        with self._lock:
            self._probe_out = False

    def _advance(self) -> None:
        if self._state == "open" and self._clock() - self._opened_at >= self.open_seconds:
            self._state, self._probe_out = "half_open", False
