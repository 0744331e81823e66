"""The target of ``bench/instructions.py``: ollama-meter as its command runs it, with the
fleet's background poller kept from running, so that callgrind counts the requests and
not the polls (a poll every 2 s is many per request at valgrind's pace). The first round of
polls, before the listener opens, still runs, as in production.

``python bench/instructions_target.py [ollama-meter options]``
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp

from ollama_meter.cli import main
from ollama_meter.gateway import fleet


async def _no_polling(self: fleet.Fleet, session: aiohttp.ClientSession) -> None:
    await asyncio.Event().wait()


if __name__ == "__main__":
    fleet.Fleet.run = _no_polling  # type: ignore[method-assign]
    sys.argv[0] = "ollama-meter"
    main()
