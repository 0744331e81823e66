"""Instructions a request, counted by callgrind: ``python bench/instructions.py [--fleet N]``.

Deterministic where timings on a shared machine are not: one fake upstream
(``upstream.py --loaded-for 86400``), ollama-meter in front of it under
``valgrind --tool=callgrind --instr-atstart=no`` (bench/instructions_target.py: the fleet's
background poller off), ``--warm-up`` (300) small non-streamed generate requests at
``--concurrency`` (64), then callgrind switched on for ``--requests`` (1,000) more and off
again: the instructions counted, divided by the requests. With ``--fleet N`` the proxy is
given the same upstream N times (``--upstream`` N times: a fleet of N names for one server,
one connection pool, the same wire traffic), so that what differs from one upstream is the
fleet's own work. ``--src DIR`` runs the ollama-meter of DIR/src; ``--out FILE`` keeps
callgrind's output (for ``callgrind_annotate``); options after ``--`` go to ollama-meter
(``-- --slots 1000 --config limits.toml``).

What moves the count between runs of the same code is how many requests the event loop
finds at each turn (about ±5k instructions a request on a busy machine): take the median of
a few runs, and compare runs made one after another. The upstream and this load generator
run on CPU 1, the proxy on CPU 0, with PYTHONHASHSEED=0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import aiohttp

HERE: Final = Path(__file__).resolve().parent
BODY: Final = b'{"model":"llama3.2","prompt":"Why is the sky blue?","stream":false}'
HEAD: Final = {"Content-Type": "application/json", "Accept": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def load(url: str, requests: int, concurrency: int) -> None:
    """Exactly ``requests`` requests, ``concurrency`` at a time; each must answer 200."""
    left = requests
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(url, data=BODY, headers=HEAD) as response:
                    await response.read()
                    if response.status != 200:
                        raise SystemExit(f"{url}: {response.status}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def wait_listening(port: int, proxy: subprocess.Popen[bytes], seconds: float = 180.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proxy.poll() is not None:
            raise SystemExit(f"the proxy exited ({proxy.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), 1.0):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the proxy did not listen in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", type=int, default=0, metavar="N")
    parser.add_argument("--src", type=Path, help="run the ollama-meter of DIR/src")
    parser.add_argument("--warm-up", type=int, default=300)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", type=Path, help="keep callgrind's output here")
    parser.add_argument(
        "proxy_args", nargs="*", metavar="-- OPTION", help="more ollama-meter options, after --"
    )
    args = parser.parse_args()
    up_port, port = free_port(), free_port()
    upstream_url = f"http://127.0.0.1:{up_port}"
    upstreams = [upstream_url] * max(1, args.fleet)
    env = dict(os.environ, PYTHONHASHSEED="0")
    if args.src is not None:
        env["PYTHONPATH"] = str(args.src.resolve() / "src")
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch) / "callgrind.out"
        upstream = subprocess.Popen(
            ["taskset", "-c", "1", sys.executable, str(HERE / "upstream.py"), str(up_port),
             "--loaded-for", "86400"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        log = Path(scratch) / "valgrind.log"
        proxy = subprocess.Popen(
            ["taskset", "-c", "0", "valgrind", "--tool=callgrind", "--instr-atstart=no",
             "--dump-instr=no", f"--callgrind-out-file={out}", f"--log-file={log}",
             sys.executable, str(HERE / "instructions_target.py"),
             "--listen", f"127.0.0.1:{port}",
             *(arg for url in upstreams for arg in ("--upstream", url)), *args.proxy_args],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            wait_listening(port, proxy)
            os.sched_setaffinity(0, {1})
            asyncio.run(load(url + "/api/generate", args.warm_up, args.concurrency))
            subprocess.run(["callgrind_control", "-i", "on", str(proxy.pid)], check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
            asyncio.run(load(url + "/api/generate", args.requests, args.concurrency))
            subprocess.run(["callgrind_control", "-i", "off", str(proxy.pid)], check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
        finally:
            proxy.send_signal(2)
            proxy.wait(120)
            upstream.terminate()
            upstream.wait(10)
        found = re.search(r"Collected : (\d+)", log.read_text())
        if found is None:
            raise SystemExit(f"no count in {log}")
        total = int(found.group(1))
    what = f"a fleet of {args.fleet} names" if args.fleet else "one upstream"
    print(f"{what}: {total:,} instructions, {total / args.requests / 1000:.1f}k a request")


if __name__ == "__main__":
    main()
