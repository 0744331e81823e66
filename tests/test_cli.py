"""The command line, through click's CliRunner (no server is left running)."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from ollama_meter.cli import main


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() configures the root logger; give pytest's handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


OPTIONS = {
    "--config": None,
    "--keys-file": None,
    "--listen": "127.0.0.1:11435",
    "--upstream": "http://127.0.0.1:11434",
    "--metrics-listen": None,
    "--preserve-host": None,
    "--max-inspect-bytes": "67108864",
    "--max-inspect-total": "268435456",
    "--max-response-tail": "1048576",
    "--max-models": "100",
    "--host-check": "auto",
    "--allowed-hosts": None,
    "--trusted-proxies": None,
    "--openai-stream-usage": None,
    "--connect-timeout": "10.0",
    "--read-timeout": "600.0",
    "--probe-timeout": "2.0",
    "--shutdown-timeout": "30.0",
    "--keepalive-timeout": "10.0",
    "--log-format": "text",
    "--log-level": "info",
    "--access-log": None,
}


def test_help_shows_every_option_with_its_variable_and_default() -> None:
    result = CliRunner().invoke(main, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for option, default in OPTIONS.items():
        assert option in text
        variable = "OLLAMA_METER_" + option[2:].replace("-", "_").upper()
        assert f"env var: {variable}" in text
        if default is not None:
            assert re.search(rf"{re.escape(option)}\b.*?default: {re.escape(default)}", text)


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("ollama-meter, version ")


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something already listens on. A refused start is always given it to listen on,
    so that were a check to fail to refuse, the start fails at once instead of serving."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--upstream", "ftp://gpu-box"], "upstream: scheme 'ftp' is not http or https"),
        (["--upstream", "gpu-box:99999"], "port '99999' is not a number"),
        (["--listen", "127.0.0.1:x"], "listen address: port 'x' is not a number"),
        (
            ["--listen", "127.0.0.1:{port}", "--upstream", "localhost:{port}"],
            "upstream http://localhost:{port} is this proxy's own listen address",
        ),
        (
            ["--listen", "0.0.0.0:{port}", "--upstream", "127.0.0.1:{port}"],
            "requests would loop",
        ),
        (["--metrics-listen", "127.0.0.1:{port}"], "is the proxy's listen address"),
        (["--connect-timeout", "0"], "Invalid value for '--connect-timeout'"),
        (["--trusted-proxies", "10.0.0.0/99"], "trusted-proxies: '10.0.0.0/99' is not"),
        (["--allowed-hosts", "a b"], "allowed-hosts: 'a b' is not a host name"),
    ],
)
def test_refused_start_is_one_clear_line(args: list[str], message: str, taken_port: int) -> None:
    args = [arg.format(port=taken_port) for arg in args]
    if "--listen" not in args:
        args += ["--listen", f"127.0.0.1:{taken_port}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message.format(port=taken_port) in result.output
    assert "Traceback" not in result.output
    assert "cannot start" not in result.output  # refused by the check, not by the taken port


def test_options_come_from_the_environment() -> None:
    result = CliRunner().invoke(main, [], env={"OLLAMA_METER_UPSTREAM": "ftp://env-host"})
    assert result.exit_code == 1
    assert "scheme 'ftp'" in result.output


def test_port_in_use_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # OLLAMA_HOST must be ignored: were it read, this start would fail on its scheme.
        result = CliRunner().invoke(
            main, ["--listen", f"127.0.0.1:{port}"], env={"OLLAMA_HOST": "ftp://ignored"}
        )
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot start: ")
    assert "address already in use" in result.output
    assert len(result.output.strip().splitlines()) == 1
