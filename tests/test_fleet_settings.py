"""The fleet's tables of the settings file: [[upstream]] and [routing]."""

from __future__ import annotations

import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ollama_meter.config import ConfigError
from ollama_meter.fleet_settings import shorthand
from ollama_meter.settings import Settings, parse_settings

_FLEET = """
[[upstream]]
name = "gpu-a"
url = "10.0.0.5"
slots = 4
max_loaded = 2

[[upstream]]
name = "gpu-b"
url = "https://gpu-b.example/ollama"
headers = { Authorization = "Bearer ${GPU_B_TOKEN}" }

[routing]
admin_upstream = "gpu-a"
"""


def _parse(text: str, environ: dict[str, str] | None = None) -> Settings:
    return parse_settings(tomllib.loads(text), "fleet.toml", Path("."), environ or {})


def test_a_fleet_file_reads_as_written() -> None:
    settings = _parse(_FLEET, {"GPU_B_TOKEN": "s3cret"})
    assert [(u.name, str(u.url), u.slots, u.max_loaded, u.headers) for u in settings.upstreams] == [
        ("gpu-a", "http://10.0.0.5:11434", 4, 2, ()),
        ("gpu-b", "https://gpu-b.example/ollama", None, 0, (("Authorization", "Bearer s3cret"),)),
    ]
    assert settings.routing.admin_upstream == "gpu-a"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_FLEET, "fleet.toml: upstream[2].headers.Authorization: ${GPU_B_TOKEN} is not set"),
        ("[[upstream]]\nname='a'\nurl='x'\n[[upstream]]\nname='a'\nurl='y'\n",
         "fleet.toml: upstream[2].name: 'a' is used by an earlier upstream"),
        ("[[upstream]]\nname='a'\nurl='ftp://x'\n",
         "fleet.toml: upstream[1].url: scheme 'ftp' is not http or https"),
        ("[[upstream]]\nname='a'\nurl='x'\nslots=0\n",
         "fleet.toml: upstream[1].slots: must be an integer >= 1, got 0"),
        ("[[upstream]]\nname='A'\nurl='x'\n", "fleet.toml: upstream[1].name: must match"),
        ("[[upstream]]\nname='a'\nurl='x'\nport=1\n", "fleet.toml: upstream[1].port: unknown key"),
        ("[[upstream]]\nname='a'\nurl='x'\nheaders={Host='y'}\n",
         "fleet.toml: upstream[1].headers.Host: not a header an upstream may be given"),
        ("[[upstream]]\nname='a'\nurl='x'\n[routing]\nadmin_upstream='b'\n",
         "fleet.toml: routing.admin_upstream: 'b' is not an upstream (known: a)"),
    ],
)  # fmt: skip
def test_a_fleet_file_that_cannot_work_is_one_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        _parse(text)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_several_upstream_options_are_u1_u2() -> None:
    assert [(u.name, str(u.url)) for u in shorthand(["a", "b:1"])] == [
        ("u1", "http://a:11434"),
        ("u2", "http://b:1"),
    ]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something listens on: a start that were not refused would fail at once."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_config_show_masks_header_values_and_several_upstream_options_make_a_fleet(
    tmp_path: Path, taken_port: int
) -> None:
    from click.testing import CliRunner

    from ollama_meter.cli import main

    path = tmp_path / "fleet.toml"
    path.write_text(_FLEET)
    result = CliRunner().invoke(
        main, ["--config", str(path), "config", "show"], env={"GPU_B_TOKEN": "s3cret"}
    )
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    shown = tomllib.loads(result.output)
    assert [u["name"] for u in shown["upstream"]] == ["gpu-a", "gpu-b"]
    assert shown["upstream"][1]["headers"] == {"Authorization": "***"}
    args = ["--upstream", "a", "--upstream", "b:1", "config", "show"]
    shown = tomllib.loads(CliRunner().invoke(main, args).output)
    assert [(u["name"], u["url"]) for u in shown["upstream"]] == [
        ("u1", "http://a:11434"),
        ("u2", "http://b:1"),
    ]
    # Every upstream of a fleet is checked for a loop, not only the first.
    result = CliRunner().invoke(
        main,
        ["--listen", f"127.0.0.1:{taken_port}", "--upstream", "a",
         "--upstream", f"127.0.0.1:{taken_port}"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "requests would loop" in result.output


def test_an_upstream_option_beside_upstream_tables_is_refused(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ollama_meter.cli import main

    path = tmp_path / "fleet.toml"
    path.write_text("[[upstream]]\nname = 'a'\nurl = 'x'\n")
    result = CliRunner().invoke(
        main, ["--config", str(path), "--upstream", "y", "--listen", "127.0.0.1:0"]
    )
    assert result.exit_code == 1
    assert "use one or the other" in result.output
