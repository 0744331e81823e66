"""The settings file: the example that ships, one-line errors, and the config commands."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from ollama_meter.app import LISTENER_RUNNERS
from ollama_meter.cli import main
from ollama_meter.config import ConfigError, HostPort
from ollama_meter.ledger_settings import LEDGER_KEYS, LedgerSettings
from ollama_meter.limit_settings import LIMIT_KEYS, LimitSettings
from ollama_meter.settings import AccessSettings, Listener, Settings, load_settings

from .access_keys import make_keys
from .conftest import MeterFactory, unused_port
from .fake_ollama import FakeOllama

EXAMPLE = Path(__file__).parent.parent / "examples" / "ollama-meter.toml"


def test_the_example_file_loads_with_every_setting(tmp_path: Path) -> None:
    settings = load_settings(str(EXAMPLE))
    access = settings.access
    assert access is not None
    assert access.keys_file == EXAMPLE.parent / "keys.toml"
    assert access.anonymous is None
    assert access.max_keep_alive == 1800
    assert access.audit_log == str(EXAMPLE.parent / "audit.jsonl")
    assert access.max_key_labels == 100
    assert access.listeners == (Listener(HostPort("127.0.0.1", 11436), "admin"),)
    # Every key the example sets is one the parser knows (and the other way round).
    assert set(tomllib.loads(EXAMPLE.read_text())["access"]) == {
        f for f in AccessSettings.__dataclass_fields__ if f != "listeners"
    } | {"listener"}
    assert settings.limits == LimitSettings()  # the example shows the defaults
    assert set(tomllib.loads(EXAMPLE.read_text())["limits"]) == set(LIMIT_KEYS)
    # The ledger: SQLite beside the file, the defaults; the PostgreSQL keys shown commented.
    assert settings.ledger == LedgerSettings(path=EXAMPLE.parent / "usage.sqlite")
    shown = set(tomllib.loads(EXAMPLE.read_text())["ledger"])
    assert shown | {"url", "password_env"} == set(LEDGER_KEYS)
    assert "# url = " in EXAMPLE.read_text()
    assert "# password_env = " in EXAMPLE.read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[acces]\n", "s.toml: acces: unknown table or key"),
        ("[access]\nkeys_file = 'k'\nanonymous = 'all'\n", "s.toml: access.anonymous: must be"),
        ("[access]\nkeys_file = 'k'\nmax_keep_alive = 'soon'\n", "s.toml: access.max_keep_alive"),
        ("[access]\nkeys_file = 'k'\nmax_key_labels = -1\n", "s.toml: access.max_key_labels"),
        ("[access]\nanonymous = 'read'\n", "s.toml: access.keys_file: missing"),
        ("[access]\nkeys_file = 'k'\nkeysfile = 'k'\n", "s.toml: access.keysfile: unknown key"),
        (
            "[access]\nkeys_file = 'k'\n[[access.listener]]\nlisten = ':x'\nrole = 'admin'\n",
            "s.toml: access.listener[1].listen: port 'x' is not a number",
        ),
        (
            "[access]\nkeys_file = 'k'\n[[access.listener]]\nlisten = ':1'\nrole = 'root'\n",
            "s.toml: access.listener[1].role: must be read, inference or admin",
        ),
        ("[access\n", "s.toml: not valid TOML"),
        ("[limits]\ndefault_rpm = -1\n", "s.toml: limits.default_rpm: must be an integer >= 0"),
        ("[limits]\ndefault_tpm = 2.5\n", "s.toml: limits.default_tpm: must be an integer >= 0"),
        ("[limits]\nmax_queue_wait = 'soon'\n", "s.toml: limits.max_queue_wait: must be a dura"),
        ("[limits]\nmax_queued_per_key = 0\n", "s.toml: limits.max_queued_per_key: must be an"),
        ("[limits]\nredis = 'http://x'\n", "s.toml: limits.redis: must be redis://HOST"),
        ("[limits]\nredis = 'redis://r'\nredis_password_env = 'NOPE_X'\n", "s.toml: limits.redis_"),
        ("[limits]\nrpm = 1\n", "s.toml: limits.rpm: unknown key"),
    ],
)
def test_a_settings_file_that_cannot_work_is_one_line(
    tmp_path: Path, text: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("s.toml").write_text(text)
    with pytest.raises(ConfigError) as error:
        load_settings("s.toml")
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)
    result = CliRunner().invoke(main, ["--config", "s.toml", "--listen", "127.0.0.1:0"])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {message}")


def test_config_check_and_show(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "ollama-meter.toml")
    config = str(tmp_path / "ollama-meter.toml")
    result = CliRunner().invoke(main, ["config", "check", "--config", config])
    assert result.exit_code == 1
    assert "keys.toml: cannot read" in result.output
    keys = make_keys(tmp_path)
    result = CliRunner().invoke(main, ["config", "check", "--config", config])
    assert result.exit_code == 0, result.output
    assert result.output == (
        f"ok: {config}; access control on, 6 keys in {keys.path}; "
        f"usage ledger in {tmp_path / 'usage.sqlite'}\n"
    )
    result = CliRunner().invoke(main, ["--listen", "127.0.0.1:9999", "config", "show"], env={
        "OLLAMA_METER_CONFIG": config,
    })  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = tomllib.loads(result.output)
    assert shown["core"]["listen"] == "127.0.0.1:9999"
    assert shown["access"]["max_keep_alive"] == 1800
    assert shown["access"]["listeners"] == [{"listen": "127.0.0.1:11436", "role": "admin"}]
    for key in (keys.admin, keys.inference):
        assert key not in result.output
        assert key[3:11] not in result.output
    assert shown["limits"]["max_queue"] == 64


def test_config_show_never_prints_the_redis_password(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[limits]\nredis = 'redis://r:6379/0'\nredis_password_env = 'RPW'\n")
    result = CliRunner().invoke(
        main, ["config", "show", "--config", str(path)], env={"RPW": "hunter2-secret"}
    )
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output
    assert tomllib.loads(result.output)["limits"]["redis"] == "redis://r:6379/0"
    assert load_settings(str(path), {"RPW": "pw"}).limits.redis == "redis://:pw@r:6379/0"  # type: ignore[union-attr]


def test_a_listener_address_already_in_use_by_the_proxy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[access]\nkeys_file = 'k'\n[[access.listener]]\nlisten = '127.0.0.1:7'\n"
                    "role = 'admin'\n")  # fmt: skip
    result = CliRunner().invoke(main, ["--config", str(path), "--listen", "127.0.0.1:7"])
    assert result.exit_code == 1
    assert "access.listener[1].listen: 127.0.0.1:7 is already a listener" in result.output


async def test_a_role_listener_lets_keyless_clients_in_with_its_role(
    start_meter: MeterFactory, fake: FakeOllama, tmp_path: Path
) -> None:
    keys = make_keys(tmp_path)
    port = unused_port()
    settings = Settings(
        access=AccessSettings(
            keys_file=keys.path, listeners=(Listener(HostPort("127.0.0.1", port), "admin"),)
        )
    )
    meter = await start_meter(settings=settings)
    assert len(meter.app[LISTENER_RUNNERS]) == 1
    async with aiohttp.ClientSession() as session:
        async with session.post(meter.url + "/api/pull", json={"model": "x", "stream": False}) as r:
            assert r.status == 401
        local = f"http://127.0.0.1:{port}"
        async with session.post(local + "/api/pull", json={"model": "x", "stream": False}) as r:
            assert r.status == 200
            assert fake.last("/api/pull").headers.get("Authorization") is None
        # The Host rule applies there, as on any loopback listener.
        async with session.get(local + "/api/tags", headers={"Host": "evil.example"}) as r:
            assert r.status == 403
    assert meter.value("key_requests_total", key="anonymous", team="", status_class="2xx") == 1
