"""``ollama-meter keys ...`` and the keys file: what the commands write, what the proxy
accepts, and the one-line refusals for files that cannot work."""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from ollama_meter.cli import main
from ollama_meter.gateway.identity import KeyRing
from ollama_meter.gateway.keys import KeysFileError, load_keys, parse_keys

_KEY = re.compile(r"om_[a-z0-9]{8}_[A-Za-z0-9_-]{43}")


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_create_prints_the_key_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    code, out, err = _run(
        "keys", "create", "--file", str(path), "--name", "alice", "--role", "inference",
        "--team", "ml", "--models", "llama3*, qwen*", "--expires", "2027-06-30",
    )  # fmt: skip
    assert code == 0, err
    key = out.strip()
    assert _KEY.fullmatch(key)
    assert "shown only now" in err
    text = path.read_text()
    assert key not in text
    assert key[12:] not in text  # the secret: after om_, the id and _ (it may hold _ itself)
    [entry] = tomllib.loads(text)["key"]
    assert entry["id"] == key[3:11]
    assert entry["sha256"] == hashlib.sha256(key.encode()).hexdigest()
    assert entry["models"] == ["llama3*", "qwen*"]
    assert entry["expires"].isoformat() == "2027-06-30T00:00:00+00:00"
    [loaded] = load_keys(path)
    found = KeyRing([loaded]).authenticate(key, 0)
    assert not isinstance(found, str)
    assert found.name == "alice"
    assert found.team == "ml"


def test_a_keys_own_limits_are_set_and_listed(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    made = _run(
        "keys", "create", "--file", str(path), "--name", "a", "--role", "inference",
        "--rpm", "60", "--concurrency", "2",
    )  # fmt: skip
    assert made[0] == 0, made
    [entry] = load_keys(path)
    assert (entry.rpm, entry.tpm, entry.concurrency) == (60, None, 2)
    assert "rpm=60,concurrency=2" in _run("keys", "list", "--file", str(path))[1]
    assert _run("keys", "limit", "--file", str(path), "a", "--tpm", "50000")[0] == 0
    [entry] = load_keys(path)
    assert (entry.rpm, entry.tpm, entry.concurrency) == (60, 50000, 2)
    assert _run("keys", "limit", "--file", str(path), "a", "--default", "--tpm", "0")[0] == 0
    [entry] = load_keys(path)
    assert (entry.rpm, entry.tpm, entry.concurrency) == (None, 0, None)
    code, _, err = _run("keys", "limit", "--file", str(path), "a", "--rpm", "-1")
    assert code == 2
    assert "-1" in err
    code, _, err = _run("keys", "limit", "--file", str(path), "a")
    assert code == 2
    assert "nothing to change" in err


def test_list_disable_enable_remove_keep_a_hand_written_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text("# Our team's keys: ask Sam before adding one.\n")
    assert _run("keys", "create", "--file", str(path), "--name", "a", "--role", "admin")[0] == 0
    assert _run("keys", "create", "--file", str(path), "--name", "b", "--role", "read")[0] == 0
    code, out, _ = _run("keys", "list", "--file", str(path))
    assert code == 0
    assert out.splitlines()[0].split() == [
        "NAME",
        "ID",
        "ROLE",
        "TEAM",
        "MODELS",
        "EXPIRES",
        "LIMITS",
        "STATE",
    ]
    assert "sha256" not in out
    assert "om_" not in out
    assert _run("keys", "disable", "--file", str(path), "a")[0] == 0
    assert "disabled" in _run("keys", "list", "--file", str(path))[1]
    assert load_keys(path)[0].disabled
    assert _run("keys", "enable", "--file", str(path), "a")[0] == 0
    assert not load_keys(path)[0].disabled
    assert _run("keys", "remove", "--file", str(path), "b")[0] == 0
    assert [e.name for e in load_keys(path)] == ["a"]
    assert path.read_text().startswith("# Our team's keys: ask Sam before adding one.\n")
    code, _, err = _run("keys", "remove", "--file", str(path), "nobody")
    assert code == 1
    assert "no key named 'nobody'" in err
    code, _, err = _run("keys", "create", "--file", str(path), "--name", "a", "--role", "read")
    assert code == 1
    assert "a key named 'a' exists already" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "Alice", "--role", "read"], "Invalid value for '--name'"),
        (["--name", "a", "--role", "root"], "Invalid value for '--role'"),
        (["--name", "a", "--role", "read", "--expires", "soon"], "Invalid value for '--expires'"),
    ],
)
def test_create_refuses_bad_values(tmp_path: Path, args: list[str], message: str) -> None:
    code, _, err = _run("keys", "create", "--file", str(tmp_path / "k.toml"), *args)
    assert code == 2
    assert message in err
    assert not (tmp_path / "k.toml").exists()


_ENTRY = '[[key]]\nid = "{id}"\nname = "{name}"\nsha256 = "' + "0" * 64 + '"\nrole = "{role}"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            _ENTRY.format(id="aaaaaaaa", name="a", role="read")
            + _ENTRY.format(id="bbbbbbbb", name="a", role="read"),
            "k.toml: key[2].name: 'a' is used by an earlier key",
        ),
        (
            _ENTRY.format(id="aaaaaaaa", name="a", role="read")
            + _ENTRY.format(id="aaaaaaaa", name="b", role="read"),
            "k.toml: key[2].id: 'aaaaaaaa' is used by an earlier key",
        ),
        (
            _ENTRY.format(id="aaaaaaaa", name="a", role="root"),
            "k.toml: key[1].role: must be read, inference or admin, got 'root'",
        ),
        (
            _ENTRY.format(id="aaaaaaaa", name="a", role="read") + "rmp = 10\n",
            "k.toml: key[1].rmp: unknown field",
        ),
        (
            _ENTRY.format(id="aaaaaaaa", name="a", role="read") + "rpm = -1\n",
            "k.toml: key[1].rpm: must be an integer >= 0, got -1",
        ),
        (
            _ENTRY.format(id="aaaaaaaa", name="a", role="read") + "tpm = 1.5\n",
            "k.toml: key[1].tpm: must be an integer >= 0, got 1.5",
        ),
        (
            _ENTRY.format(id="aaaaaaaa", name="a", role="read") + 'concurrency = "4"\n',
            "k.toml: key[1].concurrency: must be an integer >= 0, got '4'",
        ),
        (
            _ENTRY.format(id="AAAA", name="a", role="read"),
            "k.toml: key[1].id: must match [a-z0-9]{8}, got 'AAAA'",
        ),
        (
            _ENTRY.format(id="aaaaaaaa", name="a", role="read") + "expires = 2027-06-30T00:00:00\n",
            "k.toml: key[1].expires: a date-time needs a time zone",
        ),
        ("[[key]\n", "k.toml: not valid TOML"),
    ],
)
def test_a_keys_file_that_cannot_work_is_one_line(text: str, message: str) -> None:
    with pytest.raises(KeysFileError) as error:
        parse_keys(text, "k.toml")
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_the_proxy_refuses_to_start_on_a_broken_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(_ENTRY.format(id="aaaaaaaa", name="a", role="boss"))
    result = CliRunner().invoke(main, ["--keys-file", str(path), "--listen", "127.0.0.1:0"])
    assert result.exit_code == 1
    assert (
        result.output.strip()
        == f"Error: {path}: key[1].role: must be read, inference or admin, got 'boss'"
    )
    missing = tmp_path / "none.toml"
    result = CliRunner().invoke(main, ["--keys-file", str(missing), "--listen", "127.0.0.1:0"])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {missing}: cannot read: No such file or directory"
