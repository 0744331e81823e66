"""Windows shared by every replica through Redis, and what happens while Redis is away.

Rules (the limits issue, item 6):
1. With ``[limits] redis`` set, the rpm and tpm windows live in Redis through the ``limits``
   library's async Redis storage (its own scripts; none of ours). Concurrency and the queue
   stay per replica.
2. A call that fails (refused, reset, no answer within ``TIMEOUT``) switches this replica to
   windows of its own at ``limit // replicas`` (at least 1), logs once, and sets ``redis_up``
   to 0; requests never wait on a Redis that is gone. A probe every ``PROBE_INTERVAL``
   seconds switches back when Redis answers again, and logs that once too.
3. Tokens debited while Redis was away stay in the replica's own window (they are not
   replayed into Redis: the shared window would count them twice once it is back).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from limits.aio.storage import RedisStorage
from limits.errors import StorageError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .windows import MemoryWindows, Window, Windows, storage_time

log = logging.getLogger(__name__)

TIMEOUT: Final = 0.5
PROBE_INTERVAL: Final = 2.0


def storage_url(url: str) -> str:
    """The ``limits`` storage URI of a Redis URL (``redis://``, ``rediss://``, ``unix://``).
    A socket's URL may come without its ``//`` (``unix:/run/redis.sock``: how the settings'
    URL parser writes an empty host); the library would take any URI whose scheme is not
    ``redis...`` for Valkey's."""
    scheme, _, rest = url.partition(":")
    if scheme == "unix":
        return "async+redis+unix://" + rest.removeprefix("//")
    return "async+" + url


class SharedWindows:
    """A window store in Redis with a per-replica fallback (rules 1-3)."""

    def __init__(
        self,
        url: str,
        replicas: int,
        clock: Callable[[], float] = storage_time,
        on_change: Callable[[bool], None] = lambda up: None,
    ) -> None:
        storage = RedisStorage(
            storage_url(url),
            wrap_exceptions=True,
            implementation="redispy",
            key_prefix="ollama-meter",
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            retry=Retry(NoBackoff(), 0),  # type: ignore[arg-type]  # passed to redis-py
        )
        self.storage = storage
        self._shared = Windows(storage, clock)
        self._local = MemoryWindows(clock=clock)
        self._replicas = replicas
        self._on_change = on_change
        self.up = True
        self._probe: asyncio.Task[None] | None = None

    def _share(self, limit: int) -> int:
        return max(1, limit // self._replicas)

    def _lost(self, exc: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        log.warning(
            "Redis is not answering (%s): rpm and tpm are kept by this replica alone, at "
            "limit / %d, until it is back",
            str(exc)[:200] or type(exc).__name__,
            self._replicas,
        )
        self._on_change(False)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._wait_for_redis())

    async def _wait_for_redis(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                if await self.storage.check():
                    break
            except Exception:
                continue
        self.up = True
        log.warning("Redis answers again: rpm and tpm are shared by every replica again")
        self._on_change(True)

    async def start(self) -> None:
        """Look once at start: an unreachable Redis is a warning and the fallback, never a
        refusal to start."""
        try:
            ok = await self.storage.check()
        except Exception as exc:
            self._lost(exc)
            return
        if not ok:
            self._lost(ConnectionError("no answer to PING"))
        else:
            self._on_change(True)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()

    async def requests(self, key: str, rpm: int) -> Window:
        if self.up:
            try:
                return await self._shared.requests(key, rpm)
            except StorageError as exc:
                self._lost(exc.storage_error)
        return await self._local.requests(key, self._share(rpm))

    async def count_request(self, key: str, rpm: int) -> bool:
        if self.up:
            try:
                return await self._shared.count_request(key, rpm)
            except StorageError as exc:
                self._lost(exc.storage_error)
        return await self._local.count_request(key, self._share(rpm))

    async def tokens(self, key: str, tpm: int) -> Window:
        if self.up:
            try:
                return await self._shared.tokens(key, tpm)
            except StorageError as exc:
                self._lost(exc.storage_error)
        return await self._local.tokens(key, self._share(tpm))

    async def debit(self, key: str, tokens: int) -> bool:
        if self.up:
            try:
                return await self._shared.debit(key, tokens)
            except StorageError as exc:
                self._lost(exc.storage_error)
        return await self._local.debit(key, tokens)
