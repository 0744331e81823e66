"""A real PostgreSQL for tests: Debian's ``postgresql`` package, a cluster made with initdb in
a temporary directory, listening on a free loopback port, stopped (and removed) afterwards.

When the tests run as root, initdb and the server run as the ``postgres`` user (PostgreSQL
refuses to run as root). The binaries are found on PATH or in /usr/lib/postgresql/*/bin.
Without them a test skips, except with ``CI`` set (``.ci/run`` installs the package): then it
fails.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import unused_port


def binaries() -> Path | None:
    found = shutil.which("pg_ctl")
    if found is not None:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return versions[-1].parent if versions else None


@dataclass
class Postgres:
    bin: Path
    data: Path
    port: int
    user: str | None  # who runs the server (None: whoever runs the tests)

    @property
    def url(self) -> str:
        return f"postgresql://meter@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data}"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.data / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    folder = binaries()
    if folder is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is required in CI (.ci/run installs Debian's postgresql)")
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    user = "postgres" if os.geteuid() == 0 else None
    top = Path(tempfile.mkdtemp(prefix="ollama-meter-pg-"))
    data = top / "data"
    if user is not None:
        owner = pwd.getpwnam(user)
        os.chown(top, owner.pw_uid, owner.pw_gid)
    server = Postgres(folder, data, unused_port(), user)
    try:
        server._run("initdb", "-D", str(data), "-U", "meter", "--auth=trust", "-E", "UTF8")
        server.start()
    except RuntimeError as exc:
        shutil.rmtree(top, ignore_errors=True)
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL did not start: {exc}")
        pytest.skip(f"PostgreSQL did not start: {exc}")
    try:
        yield server
    finally:
        with contextlib.suppress(RuntimeError):  # already stopped by the test
            server.stop()
        shutil.rmtree(top, ignore_errors=True)
