"""A keys file of every kind of key, made with the same code ``ollama-meter keys`` uses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tomlkit.items import Table

from ollama_meter.gateway.keys import KEY_PREFIX, append_key, edit_key
from ollama_meter.settings import AccessSettings, Settings


@dataclass
class Keys:
    path: Path
    admin: str
    inference: str
    read: str
    limited: str  # inference, models = ["qwen*"]
    disabled: str
    expired: str

    def unknown_id(self) -> str:
        """A well-formed key whose id no entry has."""
        return f"{KEY_PREFIX}zzzzzzzz{self.admin[11:]}"

    def bad_secret(self) -> str:
        """The admin key's id with another secret."""
        last = "A" if self.admin[-1] != "A" else "B"
        return self.admin[:-1] + last


def _disable(table: Table) -> None:
    table["disabled"] = True


def make_keys(directory: Path) -> Keys:
    path = directory / "keys.toml"
    made = {}
    for name, role in (("admin", "admin"), ("alice", "inference"), ("reader", "read")):
        made[name], _ = append_key(path, name=name, role=role, team="ml")  # type: ignore[arg-type]
    made["limited"], _ = append_key(path, name="limited", role="inference", models=("qwen*",))
    made["off"], _ = append_key(path, name="off", role="admin")
    edit_key(path, "off", _disable)
    made["old"], _ = append_key(
        path, name="old", role="admin", expires=datetime(2020, 1, 1, tzinfo=UTC)
    )
    return Keys(
        path,
        made["admin"],
        made["alice"],
        made["reader"],
        made["limited"],
        made["off"],
        made["old"],
    )


def access_settings(keys: Keys, **options: object) -> Settings:
    return Settings(access=AccessSettings(keys_file=keys.path, **options))  # type: ignore[arg-type]
