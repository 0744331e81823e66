"""Debian's Chromium (``apt-get install chromium``) for the status page's tests, driven by
Playwright for Python with that browser as its executable: never a browser of Playwright's
own (no ``playwright install``, no download). Absent, the tests skip saying so; in CI it must
be there (.ci/run installs it).

One browser serves every test of a module. Playwright's objects belong to the event loop that
made them and each test has a loop of its own, so the browser lives in a thread with its own
loop: a test hands it a coroutine (``BrowserThread.run``), and its own loop, which serves the
fake upstreams and the proxy under test, goes on meanwhile.

Also: where the tests' screenshots go, and a page's console errors.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from playwright.async_api import Browser, ConsoleMessage, Error, Page, Playwright, async_playwright

T = TypeVar("T")

_CANDIDATES = ("chromium", "chromium-browser")

# Read at import: the suite's autouse fixture removes every OLLAMA_METER_* variable from a
# test's environment (tests/conftest.py).
ARTIFACTS: str | None = os.environ.get("OLLAMA_METER_ARTIFACTS")
SCREENSHOT_README: bool = os.environ.get("OLLAMA_METER_SCREENSHOT_README") == "1"


def chromium_path() -> str:
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found is not None:
            return found
    if os.environ.get("CI"):
        pytest.fail("chromium is required in CI (.ci/run installs Debian's chromium)")
    pytest.skip("CHROMIUM NOT INSTALLED: apt-get install chromium to run the status page's tests")


class BrowserThread:
    """Headless Chromium in a thread of its own with its own event loop."""

    def __init__(self) -> None:
        executable = chromium_path()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="browser")
        self._thread.start()
        self._playwright: Playwright | None = None
        try:
            self.browser: Browser = self._wait(self._start(executable))
        except Exception:
            self._end_loop()
            raise

    async def _start(self, executable: str) -> Browser:
        self._playwright = await async_playwright().start()
        return await self._playwright.chromium.launch(executable_path=executable, headless=True)

    def _wait(self, work: Coroutine[Any, Any, T]) -> T:
        """From a thread with no running loop (a fixture's set-up and tear-down)."""
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout=60)

    async def run(self, scenario: Callable[[Browser], Awaitable[T]]) -> T:
        """``scenario(browser)``, run in the browser's loop; awaited from a test's loop."""

        async def call() -> T:
            return await scenario(self.browser)

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), self._loop))

    def close(self) -> None:
        try:
            self._wait(self._stop())
        finally:
            self._end_loop()

    async def _stop(self) -> None:
        await self.browser.close()
        if self._playwright is not None:
            await self._playwright.stop()

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


async def in_loop(loop: asyncio.AbstractEventLoop, work: Coroutine[Any, Any, T]) -> T:
    """From a scenario: run ``work`` in the test's loop (where its servers live)."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, loop))


def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$OLLAMA_METER_ARTIFACTS when set (CI can keep it), else a pytest temporary folder."""
    if ARTIFACTS:
        path = Path(ARTIFACTS)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("status-page", numbered=True)


class Console:
    """Every console error and uncaught exception of a page, as text."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._message)
        page.on("pageerror", self._exception)

    def _message(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"{message.text} ({message.location.get('url', '')})")

    def _exception(self, error: Error) -> None:
        self.errors.append(f"uncaught: {error.message}")

    def take(self) -> list[str]:
        """The errors so far, then forgets them."""
        taken, self.errors = self.errors, []
        return taken
