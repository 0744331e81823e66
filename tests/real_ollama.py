"""A real Ollama server for integration tests, started with the workplace's ``serve-tiny``.

The server is not part of the project (a user's machine will not have it), so tests that need
it look for a folder holding ``serve-tiny`` and skip when there is none:

1. ``$REAL_OLLAMA_DIR``, if set (an explicit choice: a folder without ``serve-tiny`` there is
   an error, not a skip). Not an ``OLLAMA_METER_*`` name, because conftest's autouse fixture
   deletes those from every test's environment.
2. ``<repo>/../shared/real-ollama``, then ``/work/shared/real-ollama``.

``serve-tiny PORT DIR`` starts ``ollama serve`` on 127.0.0.1:PORT in a session of its own,
waits (bounded) until ``/api/version`` answers, creates the model ``tiny`` and prints the
server's PID. Its state and its log (``DIR/ollama.log``, the runner's lines included) stay
under DIR.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson

from .conftest import unused_port

ENV_VAR: Final = "REAL_OLLAMA_DIR"
SEARCHED: Final = (
    Path(__file__).resolve().parents[2] / "shared" / "real-ollama",
    Path("/work/shared/real-ollama"),
)
#: The model serve-tiny creates, spelt as /api/tags lists it.
TINY: Final = "tiny:latest"


class StartFailed(Exception):
    """serve-tiny did not leave a working server (no AVX2, missing libraries, ...)."""


def find() -> Path | None:
    """The folder holding serve-tiny, or None when this machine has none."""
    chosen = os.environ.get(ENV_VAR)
    if chosen:
        folder = Path(chosen)
        if not (folder / "serve-tiny").is_file():
            raise FileNotFoundError(f"{ENV_VAR}={chosen}: no serve-tiny in that folder")
        return folder
    return next((f for f in SEARCHED if (f / "serve-tiny").is_file()), None)


def not_found_reason() -> str:
    tried = ", ".join(str(f) for f in SEARCHED)
    return f"real Ollama not found: set {ENV_VAR} to a folder with serve-tiny (tried {tried})"


@dataclass(frozen=True)
class RealOllama:
    url: str
    pid: int
    state: Path

    @property
    def log(self) -> Path:
        return self.state / "ollama.log"

    def log_count(self, text: str) -> int:
        """How often ``text`` occurs in the server's log so far."""
        return self.log.read_text(errors="replace").count(text)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (Ollama then stops its runners), wait for the exit, then clear the session.

        The server is not our child (serve-tiny started it), so its exit is awaited on a
        pidfd, which becomes readable when the process ends.
        """
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
            select.select([pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
        # serve-tiny runs the server with setsid: its runners share its process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)


def _environment() -> dict[str, str]:
    """This process's environment without Ollama's settings or HTTP proxies (serve-tiny's
    curl honours those), so a developer's shell cannot change the server under test.

    The runner (llama-server) computes with one thread: with one per core, on a 2-core VM, a
    request now and then stalled for up to 2 s on a thread that lost its core; with one, no
    token took over 10 ms in the same runs. The model is far too small to need more.
    """
    kept = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OLLAMA_", "LLAMA_ARG_")) and not name.lower().endswith("_proxy")
    }
    return {**kept, "LLAMA_ARG_THREADS": "1"}


def start(folder: Path, state: Path) -> RealOllama:
    """Start a server with ``tiny`` on a free loopback port, its state under ``state``."""
    port = unused_port()
    try:
        done = subprocess.run(
            [str(folder / "serve-tiny"), str(port), str(state)],
            capture_output=True,
            text=True,
            timeout=60,
            env=_environment(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise StartFailed(f"serve-tiny: {error}") from error
    log = state / "ollama.log"
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    if done.returncode != 0:
        raise StartFailed(f"serve-tiny exited {done.returncode}: {done.stderr.strip()}\n{tail}")
    try:
        pid = int(done.stdout.split()[-1])
    except (IndexError, ValueError):
        raise StartFailed(f"serve-tiny printed {done.stdout!r}, not a PID\n{tail}") from None
    server = RealOllama(f"http://127.0.0.1:{port}", pid, state)
    # serve-tiny has already waited for /api/version; check that the model is there too.
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(server.url + "/api/tags", timeout=10) as response:
        names = [m["name"] for m in orjson.loads(response.read())["models"]]
    if names != [TINY]:
        server.stop()
        raise StartFailed(f"/api/tags lists {names}, expected [{TINY!r}]\n{tail}")
    return server
