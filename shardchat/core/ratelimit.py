"""Token bucket rate limiting (PROTOCOL.md, Limits). Pure: the caller passes ``now``."""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second refill a bucket of ``burst``; each message takes one.

    Kept to two floats so that it can live on every connection.
    """

    __slots__ = ("stamp", "tokens")

    def __init__(self, burst: int, now: float) -> None:
        self.tokens = float(burst)  # tokens left after the last take
        self.stamp = now  # when `tokens` was computed

    def take(self, now: float, rate: float, burst: int) -> bool:
        """Take one token at time ``now``; False (and nothing taken) when empty."""
        elapsed = now - self.stamp
        tokens = self.tokens
        if elapsed > 0:
            tokens = min(float(burst), tokens + elapsed * rate)
            self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False
