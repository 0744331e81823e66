"""The limit step alone, in one process: ``python bench/limit_step.py [--rate 3000]``.

``Limiter.check_now`` and ``Limiter.ended`` (the record step) for one key (anonymous, limits
of 10^9 so that nothing is refused), of a request Ollama reported 50 tokens for (debited with
``tpm``), on the storage's clock moved by ``1 / rate`` seconds a request: first 66 s of
requests to fill both windows to what ``rate`` requests a second keep in them, then
``--requests`` more, timed. Reports nanoseconds a request with rpm alone and with rpm and tpm,
the best of ``--rounds``.
"""

from __future__ import annotations

import argparse
import time
import types

from limits.aio.storage import memory

from ollama_meter.exchange import Exchange
from ollama_meter.gateway.limits import KeyLimits, Limiter
from ollama_meter.gateway.windows import WINDOW, MemoryWindows
from ollama_meter.ollama import Usage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=3000.0, help="requests a second")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    now = [1e9]
    memory.time = types.SimpleNamespace(time=lambda: now[0])  # type: ignore[attr-defined,assignment]
    step = 1 / args.rate
    for tpm in (0, 10**9):
        best = float("inf")
        entries = 0
        for _ in range(args.rounds):
            limiter = Limiter(MemoryWindows(), KeyLimits(10**9, tpm, 1000))
            windows = limiter.memory
            assert windows is not None
            x = Exchange("POST", "/api/generate", 0.0)
            x.usage = Usage(39, 11)

            def one(limiter: Limiter = limiter, x: Exchange = x) -> None:
                x.held = limiter.check_now(None, False)
                limiter.ended(x)
                now[0] += step

            for _ in range(int((WINDOW + 6) * args.rate)):
                one()
            start = time.perf_counter()
            for _ in range(args.requests):
                one()
            best = min(best, (time.perf_counter() - start) / args.requests)
            entries = windows.memory.entries()
        what = "rpm and tpm" if tpm else "rpm alone"
        print(f"{what}: {best * 1e9:,.0f} ns a request ({entries:,} entries held)")


if __name__ == "__main__":
    main()
