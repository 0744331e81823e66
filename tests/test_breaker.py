"""The breaker on an injected clock."""

from __future__ import annotations

from ollama_meter.gateway.breaker import MAX_BACKOFF, THRESHOLD, Breaker


def test_opens_after_consecutive_failures_and_backs_off_doubling() -> None:
    breaker = Breaker()
    for _ in range(THRESHOLD - 1):
        breaker.failure(now=0.0)
    assert (breaker.is_open, breaker.allows(0.0)) == (False, True)
    breaker.failure(now=0.0)
    assert breaker.is_open is True
    assert not breaker.allows(0.5)
    assert breaker.allows(1.0)  # half-open: one try
    breaker.failure(now=1.0)  # the try failed: open for twice as long
    assert not breaker.allows(2.5)
    assert breaker.allows(3.0)
    for step in range(10):
        breaker.failure(now=100.0 * step)
    assert breaker.retry_at - 900.0 == MAX_BACKOFF


def test_a_success_closes_it_and_resets_the_count() -> None:
    breaker = Breaker()
    for _ in range(THRESHOLD):
        breaker.failure(now=0.0)
    breaker.success()
    assert (breaker.is_open, breaker.allows(0.0)) == (False, True)
    breaker.failure(now=5.0)  # one failure after a success does not open it
    assert breaker.allows(5.5)
    breaker.failure(now=5.0)
    breaker.failure(now=5.0)
    assert not breaker.allows(5.5)
    assert breaker.retry_at == 6.0  # the backoff started over
