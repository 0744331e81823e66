"""A circuit breaker per upstream: stop sending requests to a server that does not answer.

Rules:
1. Only transport failures count (refused, reset, timed out before an answer). An HTTP error
   answer from Ollama, a 500 included, is an answer: the server is there.
2. ``THRESHOLD`` consecutive failures open the breaker: the upstream is skipped. After a
   backoff (1 s, doubling to 30 s) it is half-open: the next poll or request may try it; a
   success closes it and resets the backoff, a failure opens it again for longer.
3. Pure: the clock is an argument.
"""

from __future__ import annotations

from typing import Final

THRESHOLD: Final = 3
FIRST_BACKOFF: Final = 1.0
MAX_BACKOFF: Final = 30.0


class Breaker:
    __slots__ = ("_backoff", "failures", "is_open", "retry_at")

    def __init__(self) -> None:
        self.failures = 0
        self.is_open = False
        self.retry_at = 0.0
        self._backoff = FIRST_BACKOFF

    def allows(self, now: float) -> bool:
        """May a request or probe go there now (closed, or open and due for a try)?"""
        return not self.is_open or now >= self.retry_at

    def success(self) -> None:
        self.failures = 0
        self.is_open = False
        self._backoff = FIRST_BACKOFF

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.is_open or self.failures >= THRESHOLD:
            self.is_open = True
            self.retry_at = now + self._backoff
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)
