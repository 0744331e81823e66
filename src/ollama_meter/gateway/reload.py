"""The keys file in force: loaded at start, reloaded without a restart.

Rules:
1. At start a keys file that does not load stops the proxy (one line naming the file, the
   entry and the field). Later, a file that does not load keeps the keys in force, logs one
   line and counts ``config_reloads_total{result="error"}``; the same broken file is not
   reported again until it changes.
2. A reload happens on SIGHUP and when the file changes, checked every ``interval`` seconds
   (2). "Changes" compares the resolved file's device, inode, modification and change times
   and size: a Kubernetes Secret update swaps a symlink, which changes the inode the path
   resolves to. Checks run one at a time, so a slow poll can never install an older file
   after a SIGHUP installed a newer one.
3. Reading and parsing happen in a thread; the new KeyRing is swapped in on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Final

from .identity import KeyRing
from .keys import KeyEntry, KeysFileError, load_keys

log = logging.getLogger(__name__)

INTERVAL: Final = 2.0

Signature = tuple[int, int, int, int, int] | None


def _signature(path: Path) -> Signature:
    try:
        st = os.stat(path)  # follows symlinks: the file they resolve to now
    except OSError:
        return None
    # ctime too: an in-place edit that keeps the size and sets the mtime back (cp -p,
    # rsync -t) still changes it.
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


class KeysFile:
    def __init__(self, path: Path, on_load: Callable[[KeyRing, bool], None]) -> None:
        """``on_load(ring, ok)`` is called after every load: the ring in force, and whether
        the file loaded (False: the previous ring stays)."""
        self.path = path
        self._on_load = on_load
        self._signature: Signature = None
        self._ring = KeyRing(())
        self._reloaded = asyncio.Event()
        self._running: asyncio.Task[None] | None = None
        self._one_at_a_time = asyncio.Lock()

    def load(self) -> KeyRing:
        """The first load (raises KeysFileError: the proxy does not start)."""
        self._signature = _signature(self.path)
        self._ring = KeyRing(load_keys(self.path))
        return self._ring

    def next_reload(self) -> asyncio.Event:
        """Set when the next reload attempt has finished (for tests and tools)."""
        return self._reloaded

    async def check(self, force: bool = False) -> None:
        async with self._one_at_a_time:
            await self._check(force)

    async def _check(self, force: bool) -> None:
        signature = await asyncio.to_thread(_signature, self.path)
        if not force and signature == self._signature:
            return
        self._signature = signature
        ok = True
        try:
            entries: tuple[KeyEntry, ...] = await asyncio.to_thread(load_keys, self.path)
        except KeysFileError as exc:
            ok = False
            log.warning("%s; keeping the %d keys in force", exc, len(self._ring))
        else:
            self._ring = KeyRing(entries)
            log.info("reloaded %s: %d keys", self.path, len(entries))
        self._on_load(self._ring, ok)
        done, self._reloaded = self._reloaded, asyncio.Event()
        done.set()

    def _on_signal(self) -> None:
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().create_task(self.check(force=True))

    @asynccontextmanager
    async def watching(self, interval: float = INTERVAL) -> AsyncIterator[None]:
        """Reload on change and on SIGHUP while the context is open."""
        loop = asyncio.get_running_loop()
        hooked = False
        with suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self._on_signal)  # main thread only
            hooked = True

        async def poll() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    await self.check()
                except Exception:  # a bug of ours must not end reloading
                    log.exception("checking %s for changes failed", self.path)

        task = loop.create_task(poll())
        try:
            yield
        finally:
            task.cancel()
            if self._running is not None:
                self._running.cancel()
            if hooked:
                loop.remove_signal_handler(signal.SIGHUP)
            with suppress(asyncio.CancelledError):
                await task
