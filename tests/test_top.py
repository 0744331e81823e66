"""``ollama-meter top``: the live view in a pseudo-terminal, the plain print and its golden
file, and every way a fetch fails.

The command always runs as a real process (``python -m ollama_meter top``) against a server
on loopback: a stub of the proxy's ``/-/status.json`` that serves the example document of
docs/status.md and that a test changes between polls, or the real proxy in front of a fake
fleet. pexpect's calls block, so they run in
a thread while this test's loop serves the stub; readiness is read from the screen
(``expect``), never waited for with sleeps. UPDATE_GOLDEN=1 rewrites tests/golden/top-plain.txt.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import aiohttp
import pexpect
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer
from rich.console import Console
from rich.screen import Screen

from ollama_meter.app import FLEET
from ollama_meter.settings import AccessSettings, Settings, parse_settings
from ollama_meter.status import cells
from ollama_meter.status.cells import sparkline
from ollama_meter.status.terminal import render, render_plain, version_problem

from .access_keys import Keys, make_keys
from .conftest import Meter, MeterFactory, unused_port
from .fake_fleet import Fleet as FakeFleet
from .fake_fleet import FleetFactory

GOLDEN: Final = Path(__file__).parent / "golden"
EXAMPLE: Final = json.loads((GOLDEN / "status-example.json").read_text())
NOW: Final[float] = EXAMPLE["generated_at"]
EXPECT_TIMEOUT: Final = 30  # seconds; a loaded CI machine, never a measure of speed


class Stub:
    """A fake of the proxy's status endpoint: ``doc`` as JSON, or ``status`` with ``body``
    when a test sets them; records the Authorization header of every poll."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] = copy.deepcopy(EXAMPLE)
        self.status = 200
        self.body: bytes | None = None
        self.content_type = "application/json"
        self.auth: list[str | None] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.auth.append(request.headers.get("Authorization"))
        if self.status == 200 and self.body is None:
            return web.json_response(self.doc)
        body = self.body if self.body is not None else b'{"error": "ollama-meter: scripted"}'
        return web.Response(status=self.status, body=body, content_type=self.content_type)


@pytest.fixture
async def stub(aiohttp_server: AiohttpServer) -> Stub:
    stub = Stub()
    app = web.Application()
    app.router.add_get("/-/status.json", stub.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    stub.url = str(server.make_url("")).rstrip("/")
    return stub


def _env(**extra: str) -> dict[str, str]:
    # COLUMNS and LINES would override the pseudo-terminal's size (and the plain width).
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return {**env, "TERM": "xterm-256color", **extra}


async def top(*args: str, **env: str) -> tuple[int, str, str]:
    """``ollama-meter top ARGS`` with stdout a pipe: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ollama_meter",
        "top",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(**env),
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=EXPECT_TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


Spawn = Callable[..., "pexpect.spawn[str]"]  # a string: pexpect.spawn is generic only to mypy


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """``ollama-meter top --url URL ARGS`` in a pseudo-terminal of ``rows`` x ``cols``; any
    still running at the end of the test (one that failed) is killed."""
    children: list[pexpect.spawn[str]] = []

    def start(url: str, *args: str, rows: int = 40, cols: int = 120) -> pexpect.spawn[str]:
        child = pexpect.spawn(
            sys.executable,
            ["-m", "ollama_meter", "top", "--url", url, *args],
            dimensions=(rows, cols),
            env=_env(),
            encoding="utf-8",
            timeout=EXPECT_TIMEOUT,
        )
        children.append(child)
        return child

    yield start
    for child in children:
        if child.isalive():
            child.terminate(force=True)


async def expect(child: pexpect.spawn[str], pattern: str) -> None:
    await asyncio.to_thread(child.expect_exact, pattern)


async def quit_with(child: pexpect.spawn[str], keys: str = "q") -> int:
    """Type ``keys`` (or Ctrl-C for ``"^C"``) and wait for the end; the exit status."""
    if keys == "^C":
        child.sendintr()
    else:
        child.send(keys)
    await asyncio.to_thread(child.expect, pexpect.EOF)
    child.close()
    assert child.exitstatus is not None, f"killed by signal {child.signalstatus}"
    return child.exitstatus


# --- in a pseudo-terminal ---------------------------------------------------------------------


async def test_live_view_draws_refreshes_and_quits_on_q(stub: Stub, spawn: Spawn) -> None:
    child = spawn(stub.url)
    await expect(child, "gpu-a")
    await expect(child, "llama3.2:1b")
    polls = len(stub.auth)
    stub.doc["fleet"]["upstreams"][2]["name"] = "gpu-refreshed"
    await expect(child, "gpu-refreshed")
    assert len(stub.auth) > polls
    assert await quit_with(child) == 0
    assert "\x1b[?1049l" in (child.before or "")  # it left the alternate screen


async def test_live_view_marks_stale_data_and_recovers(stub: Stub, spawn: Spawn) -> None:
    child = spawn(stub.url)
    await expect(child, "gpu-a")
    stub.status = 500
    await expect(child, "STALE")
    await expect(child, "500: ollama-meter: scripted")
    await expect(child, "gpu-a")  # the last data stays on screen
    stub.status = 200
    stub.doc["fleet"]["upstreams"][0]["name"] = "gpu-back"
    await expect(child, "gpu-back")
    assert await quit_with(child) == 0


async def test_terminal_is_restored_after_quitting(stub: Stub) -> None:
    """The view's shell reads the terminal's mode after it ends: canonical and echoing
    again, as before the view put it in cbreak mode."""
    command = f"{sys.executable} -m ollama_meter top --url {stub.url}; echo rc=$?; stty -a"
    child = pexpect.spawn(
        "/bin/sh", ["-c", command], env=_env(), encoding="utf-8", timeout=EXPECT_TIMEOUT
    )
    try:
        await expect(child, "gpu-a")
        child.send("q")
        await expect(child, "rc=0")
        await asyncio.to_thread(child.expect, pexpect.EOF)
        modes = (child.before or "").split()
        assert "icanon" in modes
        assert "echo" in modes
    finally:
        child.close(force=True)


async def test_live_view_quits_on_ctrl_c(stub: Stub, spawn: Spawn) -> None:
    child = spawn(stub.url)
    await expect(child, "gpu-a")
    assert await quit_with(child, "^C") == 0


async def test_tiny_terminal_draws_and_quits(stub: Stub, spawn: Spawn) -> None:
    child = spawn(stub.url, rows=5, cols=20)
    await expect(child, "ollama-meter")
    polls = len(stub.auth)
    stub.doc["meter"]["version"] = "9.9"
    await expect(child, "ollama-meter 9.9")  # still alive, still drawing
    assert len(stub.auth) > polls
    assert await quit_with(child) == 0


async def test_live_view_shows_a_newer_version_instead_of_tables(stub: Stub, spawn: Spawn) -> None:
    stub.doc["version"] = 2
    child = spawn(stub.url)
    await expect(child, "the proxy speaks status.json version 2, this ollama-meter knows 1")
    assert await quit_with(child) == 1


# --- plain, and errors ------------------------------------------------------------------------


async def test_plain_print_matches_golden(stub: Stub) -> None:
    status, out, err = await top("--url", stub.url)
    assert (status, err) == (0, "")
    golden = GOLDEN / "top-plain.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(out)
    assert out == golden.read_text()
    assert out.isascii()
    assert "\x1b" not in out
    assert max(len(line) for line in out.splitlines()) <= 100


async def test_plain_print_follows_columns(stub: Stub) -> None:
    status, out, _ = await top("--url", stub.url, COLUMNS="60")
    assert status == 0
    assert "gpu-a" in out
    assert max(len(line) for line in out.splitlines()) <= 60


async def test_key_sent_as_bearer_from_option_and_env(stub: Stub) -> None:
    assert (await top("--url", stub.url, "--key", "from-option"))[0] == 0
    assert (await top("--url", stub.url, OLLAMA_METER_KEY="from-env"))[0] == 0
    assert stub.auth == ["Bearer from-option", "Bearer from-env"]


async def test_environment_proxy_is_not_used(stub: Stub) -> None:
    """The admin key goes to --url itself, never to a proxy named in the environment."""
    nowhere = f"http://127.0.0.1:{unused_port()}"
    code, out, _ = await top("--url", stub.url, http_proxy=nowhere, HTTP_PROXY=nowhere)
    assert code == 0
    assert "gpu-a" in out


async def test_unreachable_proxy() -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    assert await top("--url", url) == (
        1,
        "",
        f"ollama-meter top: cannot reach {url}: connection refused\n",
    )


async def test_newer_version_says_so(stub: Stub) -> None:
    stub.doc["version"] = 2
    assert await top("--url", stub.url) == (
        1,
        "",
        "ollama-meter top: the proxy speaks status.json version 2, "
        "this ollama-meter knows 1: upgrade it\n",
    )


@pytest.mark.parametrize(
    ("status", "key", "says"),
    [
        (401, None, "needs an admin key: give --key or set OLLAMA_METER_KEY"),
        (401, "wrong", "refused the key given"),
        (403, "user-key", "refused the key: /-/status.json needs an admin key"),
        (404, None, "has no /-/status.json (404)"),
    ],
)
async def test_refusals(stub: Stub, status: int, key: str | None, says: str) -> None:
    stub.status = status
    args = ("--url", stub.url) + (("--key", key) if key else ())
    code, out, err = await top(*args)
    assert (code, out) == (1, "")
    assert err.startswith(f"ollama-meter top: {stub.url} {says}")
    assert err.count("\n") == 1
    if status in (401, 403):
        assert "ollama-meter: scripted" in err  # the proxy's own reason


async def test_body_that_is_not_json(stub: Stub) -> None:
    stub.body, stub.content_type = b"<html>hello</html>", "text/html"
    assert await top("--url", stub.url) == (
        1,
        "",
        f"ollama-meter top: {stub.url}/-/status.json did not answer JSON: b'<html>hello</html>'\n",
    )


async def test_json_that_is_not_a_status_document(stub: Stub) -> None:
    stub.body = b'{"models": []}'
    code, _, err = await top("--url", stub.url)
    assert code == 1
    assert "not a status.json document" in err


# --- against the real proxy ------------------------------------------------------------------


async def _fleet_meter(
    start_fleet: FleetFactory, start_meter: MeterFactory, tmp_path: Path
) -> tuple[Meter, FakeFleet, Keys]:
    """The proxy in front of a fake fleet of three, keys on; one request served (alice's)
    and one refused (no key)."""
    fleet = await start_fleet(3, models=("llama3.2",), loaded=("llama3.2",), time_scale=0)
    keys = make_keys(tmp_path)
    upstreams = parse_settings(tomllib.loads(fleet.toml()), "fleet.toml", Path(".")).upstreams
    meter = await start_meter(Settings(access=AccessSettings(keys.path), upstreams=upstreams))
    body = {"model": "llama3.2", "prompt": "hi", "stream": False}
    async with aiohttp.ClientSession() as http:
        bearer = {"Authorization": f"Bearer {keys.inference}"}
        async with http.post(f"{meter.url}/api/generate", json=body, headers=bearer) as response:
            assert response.status == 200
        async with http.post(f"{meter.url}/api/generate", json=body) as response:
            assert response.status == 401
    return meter, fleet, keys


async def test_plain_print_of_the_real_proxy(
    start_fleet: FleetFactory, start_meter: MeterFactory, tmp_path: Path
) -> None:
    meter, _, keys = await _fleet_meter(start_fleet, start_meter, tmp_path)
    code, out, err = await top("--url", meter.url, "--key", keys.admin)
    assert (code, err) == (0, "")
    fleet_rows = [line.split() for line in out.splitlines() if line[:4] in (" u1 ", " u2 ", " u3 ")]
    assert [row[:2] for row in fleet_rows] == [["u1", "up"], ["u2", "up"], ["u3", "up"]]
    assert all("llama3.2:latest" in row for row in fleet_rows)
    assert any(line.split()[:2] == ["alice", "1"] for line in out.splitlines())
    (problem,) = [line.split() for line in out.splitlines() if " missing " in line]
    assert problem[-6:] == ["401", "missing", "/api/generate", "unknown", "anonymous", "-"]


async def test_the_real_proxy_refuses_without_an_admin_key(
    start_fleet: FleetFactory, start_meter: MeterFactory, tmp_path: Path
) -> None:
    meter, _, keys = await _fleet_meter(start_fleet, start_meter, tmp_path)
    code, _, err = await top("--url", meter.url)
    assert code == 1
    assert err.startswith(f"ollama-meter top: {meter.url} needs an admin key: give --key")
    code, _, err = await top("--url", meter.url, "--key", keys.bad_secret())
    assert code == 1
    assert err.startswith(f"ollama-meter top: {meter.url} refused the key given (401: ")
    code, _, err = await top("--url", meter.url, "--key", keys.inference)
    assert code == 1
    assert err.startswith(f"ollama-meter top: {meter.url} refused the key: ")
    assert "(403: " in err
    assert keys.inference not in err


async def test_live_view_of_the_real_proxy_shows_an_upstream_going_down(
    start_fleet: FleetFactory, start_meter: MeterFactory, tmp_path: Path, spawn: Spawn
) -> None:
    meter, fleet, keys = await _fleet_meter(start_fleet, start_meter, tmp_path)
    child = spawn(meter.url, "--key", keys.admin)
    await expect(child, "u3")
    assert "DOWN" not in (child.before or "")
    await fleet[1].refuse()
    await meter.app[FLEET].poll_all(tags=False)  # what the poller does next
    await expect(child, "DOWN")
    assert await quit_with(child) == 0


# --- the pure view ----------------------------------------------------------------------------


def _draw(doc: Mapping[str, object], width: int, height: int) -> str:
    out = io.StringIO()
    console = Console(file=out, width=width, height=height, force_terminal=True)
    console.print(Screen(render(doc, NOW, error="cannot reach it")))
    return out.getvalue()


@pytest.mark.parametrize("width", [1, 2, 5, 10, 20, 33, 50, 80, 120, 250])
@pytest.mark.parametrize("height", [1, 5, 24])
def test_any_size_draws(width: int, height: int) -> None:
    assert _draw(EXAMPLE, width, height)


def test_text_from_the_document_is_never_markup_or_control_codes() -> None:
    doc = copy.deepcopy(EXAMPLE)
    doc["models"]["items"][0]["name"] = "[bold]evil[/bold]"
    doc["keys"]["items"][0]["key"] = "[red]k"
    doc["fleet"]["upstreams"][0]["name"] = "a\x1b[2Jb"
    out = render_plain(doc, NOW, 200)
    assert "[bold]evil[/bold]" in out
    assert "[red]k" in out
    assert "a?[2Jb" in out
    assert "\x1b" not in _draw(doc, 200, 50).replace("\x1b[", "")  # only rich's own codes


@pytest.mark.parametrize(
    "doc",
    [
        {"version": 1},
        {"version": 1, "meter": [], "fleet": None, "models": "x", "keys": 3, "problems": {}},
        {
            "version": 1,
            "generated_at": "soon",
            "fleet": {
                "queue": {"depth": None, "max": "x"},
                "upstreams": [{"name": 5, "up": "yes", "models": [None, {"size_bytes": 0}]}, 7],
            },
            "models": {
                "window_seconds": 0,
                "items": [None, {"history": {"completion_tokens_per_second": [None, "a", 1e308]}}],
                "total": {"history": []},
            },
            "keys": {"items": [{"key": None}], "today": {"items": [{"key": "x", "requests": -1}]}},
            "problems": [{"time": -1e12, "status": True}],
        },
    ],
)
def test_a_document_missing_or_mistyping_fields_still_draws(doc: dict[str, object]) -> None:
    assert render_plain(doc, NOW, 100)
    assert _draw(doc, 20, 5)


def test_version_problem() -> None:
    assert version_problem(EXAMPLE) is None
    assert version_problem({"version": 1}) is None
    assert "version 3" in (version_problem({"version": 3}) or "")
    assert "not a status.json" in (version_problem({"version": "1"}) or "")
    assert "not a status.json" in (version_problem({"version": True}) or "")


def test_sparkline() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([None, None, 1, 1], width=2) == " █"
    assert sparkline([2, 2, 4, 4], width=2, ascii=True) == "+@"
    assert sparkline([None] * 180) == " " * 20
    assert sparkline([0.0] * 180) == "▁" * 20
    assert sparkline(None) == ""
    assert len(sparkline(list(range(180)))) == 20


def test_numbers() -> None:
    assert [cells.duration(s) for s in (0, 59.9, 60, 3599, 7325.5, 90000)] == [
        "0s",
        "59s",
        "1m00s",
        "59m59s",
        "2h02m",
        "1d01h",
    ]
    assert [cells.count(n) for n in (5120, 12_345, 1_210_000, None, "7")] == [
        "5120",
        "12.3k",
        "1.21M",
        "-",
        "-",
    ]
    assert [cells.seconds(s) for s in (0.31, 2.79, None)] == ["310ms", "2.79s", "-"]
    assert [cells.rate(r) for r in (2.4, 96.3, 93750.0, None)] == ["2.40", "96.3", "93.8k", "-"]
    assert cells.size(2019393189) == "2.0 GB"
