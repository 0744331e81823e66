"""The limit step: per-key concurrency, then requests per minute, then tokens per minute.

Rules (the limits issue's contract, items 1-3):
1. In that order; the first limit a request is over refuses it with 429, a body naming the
   limit, ``Retry-After`` (whole seconds until it would be admitted, at least 1), and on
   ``/v1`` OpenAI's ``x-ratelimit-*`` headers for each window the key has. A refused request
   takes nothing: no place in the concurrency count, no entry in the request window.
2. Concurrency counts a key's requests from admission here to the record step (queued ones
   included). A key's requests share one ``Held`` (made once for the key, not once a
   request): the count, the limits they go by, and in one process the names of the key's
   windows. A request holds it from admission (``Exchange.held``) until its record step
   (``ended``) gives its place back and lets go of it, so a place is given back exactly once
   per admitted request. A reload of the keys file gives the key its new limits from its
   next request on, its count unchanged; the tokens of a request that ends after it are
   debited under the new tpm.
3. A key's limits are its own (keys file) where it sets them, else the ``[limits]`` defaults;
   without access control everyone is ``anonymous`` and has the defaults. 0 is unlimited.
4. The windows (windows.py) live in memory, or in Redis for a fleet of proxies
   (shared_windows.py switches to per-replica windows while Redis is away).
5. Windows in memory are asked without awaiting (``check_now``; the debit is a plain call
   in the record step), by their names, of ``LimitsMemory`` itself: the same steps and
   answers as ``check``, which awaits the Redis storage's. On that path the token window is
   looked at before the request is counted in the request window, so that counting it is
   the last step and nothing has to be taken back; which limit a refusal names is still rpm
   before tpm.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NoReturn, Protocol

from ..exchange import Exchange
from ..inbound import Refusal
from .identity import ANONYMOUS, Identity
from .windows import WINDOW, MemoryWindows, Window

RATE: Final = "rate"
TOKENS: Final = "tokens"
KEY_CONCURRENCY: Final = "key_concurrency"
#: Retry-After of a key at its concurrency: a request of its own must end first, which the
#: proxy cannot foresee; a second is what a client retrying politely waits.
_CONCURRENCY_WAIT: Final = 1


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """A key's limits; 0 is unlimited."""

    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0

    @property
    def any(self) -> bool:
        return bool(self.rpm or self.tpm or self.concurrency)


class WindowStore(Protocol):
    async def requests(self, key: str, rpm: int) -> Window: ...
    async def count_request(self, key: str, rpm: int) -> bool: ...
    async def tokens(self, key: str, tpm: int) -> Window: ...
    async def debit(self, key: str, tokens: int) -> bool: ...


@dataclass(slots=True, eq=False)
class Held:
    """A key's place in the limits, shared by its requests that are admitted and not yet
    recorded (rule 2)."""

    key: str
    limits: KeyLimits
    #: What ``limits`` was resolved from: the key's Identity (None: the defaults).
    source: Identity | None = None
    in_flight: int = 0
    #: The names of the key's request and token windows in memory (rule 5).
    requests: str = ""
    tokens: str = ""


#: Keys whose Held is kept while none of their requests holds it; past it they are made again.
_KEYS_KEPT: Final = 4096


def retry_after(wait: float) -> int:
    """Whole seconds a client must wait to be admitted: rounded up, at least 1."""
    return max(1, math.ceil(wait - 1e-9))


def reset_text(wait: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` form: ``1s``, ``6m0s``, ``20ms``."""
    if wait < 1:
        return f"{max(0, math.ceil(wait * 1000))}ms"
    seconds = math.ceil(wait)
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def openai_headers(requests: Window | None, tokens: Window | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    for suffix, window in (("requests", requests), ("tokens", tokens)):
        if window is not None:
            headers[f"x-ratelimit-limit-{suffix}"] = str(window.limit)
            headers[f"x-ratelimit-remaining-{suffix}"] = str(window.remaining)
            headers[f"x-ratelimit-reset-{suffix}"] = reset_text(window.wait)
    return headers


class Limiter:
    """Rules 1-3 over a window store."""

    def __init__(
        self,
        windows: WindowStore,
        defaults: KeyLimits,
        refused: Callable[[str, str], None] = lambda reason, key: None,
    ) -> None:
        self.windows = windows
        self.defaults = defaults
        self._refused = refused
        #: Each key's place (rule 2), by its name.
        self._held: dict[str, Held] = {}
        self._debits: set[asyncio.Task[None]] = set()
        #: The windows when they are in memory: asked without awaiting (rule 5).
        self.memory = windows if isinstance(windows, MemoryWindows) else None
        self._store = None if self.memory is None else self.memory.memory

    @property
    def in_flight(self) -> dict[str, int]:
        """Requests of each key between admission and the record step (tests)."""
        return {key: held.in_flight for key, held in self._held.items() if held.in_flight}

    def held_for(self, key: str, limits: KeyLimits, source: Identity | None = None) -> Held:
        """The key's place, going by ``limits`` from now on (``source``: what they were
        resolved from, looked at first by ``check_now``)."""
        held = self._held.get(key)
        if held is None:
            if len(self._held) >= _KEYS_KEPT:
                self._held = {k: h for k, h in self._held.items() if h.in_flight}
            held = self._held[key] = Held(key, limits, source)
        else:
            held.source = source
            if held.limits == limits:
                return held
            held.limits = limits
        if self.memory is not None:
            held.requests, held.tokens = self.memory.names(key, limits.rpm)
        return held

    def _resolve(self, identity: Identity | None) -> Held:
        if identity is None or not identity.keyed:
            held = self._held.get(ANONYMOUS)
            if held is not None and held.source is None:
                return held
            return self.held_for(ANONYMOUS, self.defaults)
        held = self._held.get(identity.name)
        if held is not None:
            source = held.source
            if source is identity or (  # a role listener's copy: the same limits
                source is not None
                and source.rpm == identity.rpm
                and source.tpm == identity.tpm
                and source.concurrency == identity.concurrency
            ):
                return held
        limits = self.limits_of(identity.rpm, identity.tpm, identity.concurrency)
        return self.held_for(identity.name, limits, identity)

    def check_now(self, identity: Identity | None, openai: bool) -> Held | None:
        """``check`` over windows in memory, without awaiting (rule 5; ``memory`` is set)."""
        held = self._resolve(identity)
        limits = held.limits
        if not (limits.rpm or limits.tpm or limits.concurrency):
            return None
        return self.admit_now(held, openai)

    def admit_now(self, held: Held, openai: bool) -> Held:
        """``admit`` over windows in memory (rule 5)."""
        limits = held.limits
        count = held.in_flight
        if limits.concurrency and count >= limits.concurrency:
            self._at_concurrency(held.key, count)
        store = self._store
        assert store is not None
        tpm = limits.tpm
        if tpm and store.live_now(held.tokens, tpm, WINDOW) >= tpm:
            self._over(held, openai, tokens=True)
        rpm = limits.rpm
        if rpm and not store.acquire_now(held.requests, rpm, WINDOW):
            self._over(held, openai, tokens=False)
        held.in_flight = count + 1
        return held

    def _over(self, held: Held, openai: bool, tokens: bool) -> NoReturn:
        """The 429 of a key found over its tpm (``tokens``) or its rpm: rpm is named first
        when both are over."""
        memory = self.memory
        assert memory is not None
        key, limits = held.key, held.limits
        requests = memory.requests_now(key, limits.rpm) if limits.rpm else None
        token_window = memory.tokens_now(key, limits.tpm) if limits.tpm else None
        rate = requests is not None and (not tokens or requests.wait > 0)
        raise self._over_window(
            RATE if rate else TOKENS, key, limits, requests, token_window, openai
        )

    def _at_concurrency(self, key: str, count: int) -> NoReturn:
        raise self._refusal(
            KEY_CONCURRENCY,
            key,
            f"key {key!r} has {count} requests in flight, its limit (concurrency)",
            _CONCURRENCY_WAIT,
            {},
        )

    async def check(self, identity: Identity | None, openai: bool) -> Held | None:
        """The limit step for a request of ``identity`` (None or not keyed: anonymous)."""
        held = self._resolve(identity)
        if not held.limits.any:
            return None
        return await self.admit(held, openai)

    def ended(self, x: Exchange) -> None:
        """The record step: the place back (the request lets go of it), and the tokens
        Ollama reported debited."""
        held = x.held
        if held is None:
            return
        x.held = None
        held.in_flight -= 1
        tpm = held.limits.tpm
        usage = x.usage
        if tpm and usage is not None and usage.tokens_reported:
            tokens = usage.prompt_tokens + usage.completion_tokens
            if tokens > 0 and self._store is not None:
                self._store.add_now(held.tokens, tpm if tokens > tpm else tokens, WINDOW)
            elif tokens > 0:
                task = asyncio.get_running_loop().create_task(self.debit(held, tokens))
                self._debits.add(task)
                task.add_done_callback(self._debits.discard)

    async def settle(self) -> None:
        """Wait for the debits under way (tests; shutdown)."""
        while self._debits:
            await asyncio.gather(*self._debits, return_exceptions=True)

    def limits_of(self, rpm: int | None, tpm: int | None, concurrency: int | None) -> KeyLimits:
        """A key's limits: each one its own where it sets it (None: the default; rule 3)."""
        d = self.defaults
        if rpm is None and tpm is None and concurrency is None:
            return d
        return KeyLimits(
            d.rpm if rpm is None else rpm,
            d.tpm if tpm is None else tpm,
            d.concurrency if concurrency is None else concurrency,
        )

    async def admit(self, held: Held, openai: bool) -> Held:
        """A place for this request of ``held``'s key, or a 429 Refusal."""
        key, limits = held.key, held.limits
        count = held.in_flight
        if limits.concurrency and count >= limits.concurrency:
            self._at_concurrency(key, count)
        held.in_flight = count + 1  # taken before the windows are asked (they await)
        try:
            await self._windows(key, limits, openai)
        except BaseException:
            self.release(held)
            raise
        return held

    async def _windows(self, key: str, limits: KeyLimits, openai: bool) -> None:
        windows = self.windows
        requests = await windows.requests(key, limits.rpm) if limits.rpm else None
        tokens = await windows.tokens(key, limits.tpm) if limits.tpm else None
        if requests is not None and requests.wait > 0:
            raise self._over_window(RATE, key, limits, requests, tokens, openai)
        if tokens is not None and tokens.wait > 0:
            raise self._over_window(TOKENS, key, limits, requests, tokens, openai)
        if requests is not None and not await windows.count_request(key, limits.rpm):
            # Another request of the key took the last place since the look above.
            requests = await windows.requests(key, limits.rpm)
            raise self._over_window(RATE, key, limits, requests, tokens, openai)

    def _over_window(
        self,
        reason: str,
        key: str,
        limits: KeyLimits,
        requests: Window | None,
        tokens: Window | None,
        openai: bool,
    ) -> Refusal:
        """The 429 of a key over its rpm (``RATE``) or its tpm, with the windows it has."""
        if reason == RATE:
            assert requests is not None
            limit, window = f"{limits.rpm} requests per minute (rpm)", requests
        else:
            assert tokens is not None
            limit, window = f"{limits.tpm} tokens per minute (tpm)", tokens
        headers = openai_headers(requests, tokens) if openai else {}
        return self._refusal(
            reason, key, f"key {key!r} is over its limit of {limit}", window.wait, headers
        )

    def _refusal(
        self, reason: str, key: str, what: str, wait: float, headers: dict[str, str]
    ) -> Refusal:
        self._refused(reason, key)
        seconds = retry_after(wait)
        return Refusal(
            429,
            f"ollama-meter: {what}; retry in {seconds} s",
            {"Retry-After": str(seconds), **headers},
            reason=reason,
        )

    def release(self, held: Held) -> None:
        """The place of a request that was not admitted after all back (the awaited path)."""
        held.in_flight -= 1

    async def debit(self, held: Held, tokens: int) -> None:
        """The tokens Ollama reported for the request, into its key's window: at most
        ``tpm`` of them, which already fill the window for a minute (it only ever counts its
        newest ``tpm`` units). In memory a debit is one entry whatever its weight; the Redis
        storage keeps one list element a unit, so more would cost Redis an element each, from
        a count the proxy does not bound."""
        tpm = held.limits.tpm
        if tpm and tokens > 0:
            await self.windows.debit(held.key, min(tokens, tpm))
