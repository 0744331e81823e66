"""examples/systemd/: the ollama-meter unit, checked by systemd's own tools and run confined,
and the drop-in that binds a host's Ollama to the Docker bridge.

``systemd-analyze verify`` needs the ExecStart binary to exist, so the unit is copied with
ExecStart pointing at this environment's ``ollama-meter`` script, nothing else changed.
``systemd-analyze security --offline`` scores its hardening. No systemd manager is needed: the
confinement that could break a Python process, MemoryDenyWriteExecute, is reproduced with the
kernel's own switch for it (prctl PR_SET_MDWE, Linux 6.3+) and the proxy is run under it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import pytest

from ollama_meter.cli import main
from ollama_meter.config import Config

from .conftest import unused_port
from .fake_ollama import FakeOllama
from .test_operator_kit import ROOT, cli_envvars, load_yaml, run, tool

UNIT = ROOT / "examples" / "systemd" / "ollama-meter.service"
SCRIPT = Path(sys.executable).parent / "ollama-meter"  # what pip installs, like ExecStart's


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every directive, in order; keys may repeat."""
    found = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key, value))
    return found


def values(key: str, text: str | None = None) -> list[str]:
    return [v for _, k, v in directives(text or UNIT.read_text()) if k == key]


def installed_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit (or text) with ExecStart at this environment's ollama-meter script."""
    [exec_start] = values("ExecStart")
    assert Path(exec_start).name == SCRIPT.name
    body = (text or UNIT.read_text()).replace(f"ExecStart={exec_start}", f"ExecStart={SCRIPT}")
    copy = tmp_path / UNIT.name
    copy.write_text(body)
    return copy


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    result = run(analyze, "verify", str(installed_copy(tmp_path)))
    # verify exits 0 even on unknown or unparsable settings; it only warns about them.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    broken = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystem=stric")
    result = run(analyze, "verify", str(installed_copy(tmp_path, broken)))
    assert "protect system value" in result.stderr  # the check can fail


def test_unit_is_hardened(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    # Exposure on systemd's 0-10 scale, in tenths: at most 2.0 ("OK").
    result = run(
        analyze, "security", "--offline=yes", "--threshold=20", str(installed_copy(tmp_path))
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for setting in (
        "DynamicUser=yes",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "MemoryDenyWriteExecute=yes",
    ):
        key, _, value = setting.partition("=")
        assert value in values(key), setting
    # The score can fail: the same unit without its hardening section is far above it.
    bare = UNIT.read_text().partition("# Hardening:")[0] + "[Install]\nWantedBy=multi-user.target\n"
    result = run(
        analyze, "security", "--offline=yes", "--threshold=20", str(installed_copy(tmp_path, bare))
    )
    assert result.returncode != 0


def test_unit_starts_after_the_network_and_ollama() -> None:
    for key in ("After", "Wants"):
        [line] = values(key)
        assert {"network-online.target", "ollama.service"} <= set(line.split()), key
    assert values("WantedBy") == ["multi-user.target"]
    # SIGTERM's grace for requests in flight ends before systemd kills the process.
    [grace] = [p.default for p in main.params if p.name == "shutdown_timeout"]
    [stop] = values("TimeoutStopSec")
    assert isinstance(grace, float)
    assert float(stop.removesuffix("s")) > grace


def unit_environment() -> dict[str, str]:
    return dict(value.partition("=")[::2] for value in values("Environment"))


def test_unit_environment_is_what_the_cli_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    env = unit_environment()
    assert {"OLLAMA_METER_LISTEN", "OLLAMA_METER_UPSTREAM"} <= set(env) <= set(cli_envvars())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # click reads and checks every variable exactly as it would when systemd starts it.
    with main.make_context("ollama-meter", []) as ctx:
        [upstream] = ctx.params["upstream"]  # one: not a fleet
        config = Config.build(listen=ctx.params["listen"], upstream=upstream)
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 11435)
    assert (config.upstream.host, config.upstream.port) == ("127.0.0.1", 11434)


#: Run argv[1:] with memory that is writable and executable refused, as
#: MemoryDenyWriteExecute=yes refuses it; exit 77 where the kernel cannot.
CONFINE = """
import ctypes, mmap, os, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0):
    sys.exit(77)
try:
    mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    os.execv(sys.argv[1], sys.argv[1:])
sys.exit("writable and executable memory was still allowed")
"""


async def test_proxy_runs_without_writable_executable_memory(fake: FakeOllama) -> None:
    port = unused_port()
    env = {
        **os.environ,
        **unit_environment(),
        "OLLAMA_METER_LISTEN": f"127.0.0.1:{port}",
        "OLLAMA_METER_UPSTREAM": fake.url,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CONFINE, str(SCRIPT), env=env, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    log: list[str] = []
    try:
        while "listening on" not in "".join(log[-1:]):
            line = (await asyncio.wait_for(proc.stderr.readline(), timeout=30)).decode()
            if not line:
                if await proc.wait() == 77:
                    pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
                raise AssertionError(f"ollama-meter ended under MemoryDenyWriteExecute: {log}")
            log.append(line)
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            body = {"model": "llama3.2", "messages": [{"role": "user", "content": "Hi"}]}
            async with session.post(f"{url}/api/chat", json=body) as response:
                assert response.status == 200
                lines = [line async for line in response.content]
            assert b'"done":true' in lines[-1]
            async with session.get(f"{url}/metrics") as response:
                metrics = await response.text()
        assert 'ollama_meter_requests_total{endpoint="/api/chat"' in metrics
        assert "process_resident_memory_bytes " in metrics
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


DROP_IN = ROOT / "examples" / "systemd" / "ollama.service.d" / "docker-bridge.conf"


def test_docker_bridge_drop_in_binds_ollama_where_the_container_looks(tmp_path: Path) -> None:
    """The drop-in for compose.host-ollama.yaml, on a stand-in ollama.service."""
    analyze = tool("systemd-analyze")
    text = DROP_IN.read_text()
    for key in ("After", "Wants"):
        assert values(key, text) == ["docker.service"], key
    [setting] = values("Environment", text)
    name, _, address = setting.partition("=")
    assert name == "OLLAMA_HOST"
    host, _, port = address.rpartition(":")
    assert host.startswith("172.17.")  # docker0 by Docker's default, not 0.0.0.0 or loopback
    upstream = load_yaml("compose.host-ollama.yaml")["services"]["ollama-meter"]["environment"]
    config = Config.build(listen="0.0.0.0:11435", upstream=upstream["OLLAMA_METER_UPSTREAM"])
    assert (config.upstream.host, config.upstream.port) == ("host.docker.internal", int(port))

    def verify(drop_in: str) -> str:
        (tmp_path / "ollama.service.d").mkdir(exist_ok=True)
        (tmp_path / "ollama.service.d" / DROP_IN.name).write_text(drop_in)
        (tmp_path / "ollama.service").write_text(
            f"[Unit]\nDescription=Ollama\n[Service]\nExecStart={SCRIPT}\n"
        )
        result = run(analyze, "verify", str(tmp_path / "ollama.service"))
        assert result.returncode == 0, result.stderr
        return result.stdout + result.stderr

    assert verify(text) == ""
    # The drop-in is read: a misspelt key in it is reported.
    assert "Wnats" in verify(text.replace("Wants=", "Wnats="))
