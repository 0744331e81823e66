"""API keys: their shape, their hashes, and the keys file that holds them.

Rules:
1. A key is ``om_`` + an 8-character id (``[a-z0-9]``) + ``_`` + 43 characters of base64url
   (32 random bytes from ``secrets``). The id is not secret: it finds the entry in O(1). The
   secret is checked by comparing SHA-256 digests of the whole key string with
   ``hmac.compare_digest``; these are random 256-bit secrets, so a slow password hash would
   only add latency.
2. The keys file is TOML and holds hashes only, one ``[[key]]`` table per key with exactly
   the fields of ``KeyEntry`` (an unknown field is an error, so a typo never silently widens
   or narrows a key). ``name`` and ``id`` are unique.
3. Every problem is a ``KeysFileError`` of one line naming the file, the entry (counting from
   1) and the field: ``keys.toml: key[2].role: must be read, inference or admin``.
4. The command line edits the file (``append_key``, ``edit_key``) under an exclusive lock,
   through tomlkit so that a hand-written file keeps its comments and layout, and replaces it
   atomically (a new inode: a running proxy sees the change and never reads half a file).

Parsing and hashing are pure; only ``load_keys`` and the editors touch the disk.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import tempfile
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final, Literal, cast

import tomlkit
from tomlkit.items import AoT, Table

Role = Literal["read", "inference", "admin"]
ROLES: Final[tuple[Role, ...]] = ("read", "inference", "admin")

KEY_PREFIX: Final = "om_"
KEY_LENGTH: Final = 55  # om_ + 8 + _ + 43
_ID_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz0123456789"
_KEY: Final = re.compile(r"om_([a-z0-9]{8})_[A-Za-z0-9_-]{43}")
NAME: Final = re.compile(r"[a-z0-9_.-]{1,32}")
_ID: Final = re.compile(r"[a-z0-9]{8}")
_HEX_DIGEST: Final = re.compile(r"[0-9a-f]{64}")
_FIELDS: Final = frozenset(
    {
        "id",
        "name",
        "sha256",
        "role",
        "team",
        "models",
        "expires",
        "disabled",
        "rpm",
        "tpm",
        "concurrency",
    }
)
_MAX_PATTERN: Final = 256


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message names the file, entry and field."""


@dataclass(frozen=True, slots=True)
class KeyEntry:
    id: str
    name: str
    digest: bytes  # SHA-256 of the whole key string
    role: Role
    team: str | None = None
    #: Glob patterns of the models an inference request may name; None: every model.
    models: tuple[str, ...] | None = None
    #: Unix time from which the key no longer works; None: never.
    expires: float | None = None
    disabled: bool = False
    #: The key's own limits (None: the ``[limits]`` default; 0: unlimited).
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None


def key_id(key: str) -> str | None:
    """The id of a string shaped like a key, else None (cheap: the length is checked first)."""
    if len(key) != KEY_LENGTH:
        return None
    match = _KEY.fullmatch(key)
    return match.group(1) if match else None


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key(taken: Callable[[str], bool] = lambda _: False) -> tuple[str, str]:
    """(a new key, its id): an id for which ``taken`` is false, and 32 random bytes."""
    while True:
        ident = "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))
        if not taken(ident):
            return f"{KEY_PREFIX}{ident}_{secrets.token_urlsafe(32)}", ident


def parse_expiry(value: object, where: str) -> float:
    """A TOML date or offset date-time (or its text) as Unix time; a date is 00:00 UTC."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = (
                date.fromisoformat(text)
                if len(text) == 10
                else datetime.fromisoformat(text.replace("Z", "+00:00"))
            )
        except ValueError:
            raise KeysFileError(f"{where}: {value!r} is not a date or date-time") from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise KeysFileError(f"{where}: a date-time needs a time zone (write it with Z)")
        return value.timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp()
    raise KeysFileError(f"{where}: must be a date or date-time, such as 2027-06-30T00:00:00Z")


def _text(table: dict[str, Any], field: str, where: str, pattern: re.Pattern[str]) -> str:
    value = table.get(field)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise KeysFileError(f"{where}.{field}: must match {pattern.pattern}, got {value!r}"[:300])
    return value


def _entry(table: object, where: str) -> KeyEntry:
    if not isinstance(table, dict):
        raise KeysFileError(f"{where}: must be a table")
    unknown = sorted(set(table) - _FIELDS)
    if unknown:
        raise KeysFileError(f"{where}.{unknown[0]}: unknown field"[:300])
    for field in ("id", "name", "sha256", "role"):
        if field not in table:
            raise KeysFileError(f"{where}.{field}: missing")
    role = table["role"]
    if role not in ROLES:
        raise KeysFileError(f"{where}.role: must be read, inference or admin, got {role!r}"[:300])
    team = table.get("team")
    models = table.get("models")
    if models is not None:
        if not isinstance(models, list) or not all(
            isinstance(m, str) and m.strip() and len(m) <= _MAX_PATTERN for m in models
        ):
            raise KeysFileError(f"{where}.models: must be a list of model names or globs")
        models = tuple(m.strip() for m in models)
    disabled = table.get("disabled", False)
    if not isinstance(disabled, bool):
        raise KeysFileError(f"{where}.disabled: must be true or false")
    expires = table.get("expires")
    return KeyEntry(
        id=_text(table, "id", where, _ID),
        name=_name(table, where),
        digest=bytes.fromhex(_text(table, "sha256", where, _HEX_DIGEST)),
        role=cast(Role, role),
        team=None if team is None else _text(table, "team", where, NAME),
        models=models,
        expires=None if expires is None else parse_expiry(expires, f"{where}.expires"),
        disabled=disabled,
        rpm=_limit(table, "rpm", where),
        tpm=_limit(table, "tpm", where),
        concurrency=_limit(table, "concurrency", where),
    )


LIMIT_FIELDS: Final = ("rpm", "tpm", "concurrency")


#: What the metrics, limits and ledger call requests without a key, and keys past
#: max_key_labels: a key of that name would share their counts and limits.
RESERVED_NAMES: Final = frozenset({"anonymous", "other"})


def _name(table: dict[str, Any], where: str) -> str:
    name = _text(table, "name", where, NAME)
    if name in RESERVED_NAMES:
        raise KeysFileError(
            f"{where}.name: {name!r} is reserved (it names requests without a key, or keys "
            "past max_key_labels)"
        )
    return name


def _limit(table: dict[str, Any], field: str, where: str) -> int | None:
    value = table.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KeysFileError(f"{where}.{field}: must be an integer >= 0, got {value!r}"[:300])
    return value


def parse_keys(text: str, source: str) -> tuple[KeyEntry, ...]:
    """Every entry of a keys file's text (``source`` names it in errors)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeysFileError(f"{source}: not valid TOML: {exc}") from None
    extra = sorted(set(doc) - {"key"})
    if extra:
        raise KeysFileError(f"{source}: {extra[0]}: unknown table (keys are [[key]] tables)")
    tables = doc.get("key", [])
    if not isinstance(tables, list):
        raise KeysFileError(f"{source}: key: must be [[key]] tables")
    entries: list[KeyEntry] = []
    names: set[str] = set()
    ids: set[str] = set()
    for number, table in enumerate(tables, 1):
        where = f"{source}: key[{number}]"
        entry = _entry(table, where)
        if entry.name in names:
            raise KeysFileError(f"{where}.name: {entry.name!r} is used by an earlier key")
        if entry.id in ids:
            raise KeysFileError(f"{where}.id: {entry.id!r} is used by an earlier key")
        names.add(entry.name)
        ids.add(entry.id)
        entries.append(entry)
    return tuple(entries)


def load_keys(path: Path) -> tuple[KeyEntry, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise KeysFileError(f"{path}: cannot read: {reason}") from None
    return parse_keys(text, str(path))


# --- editing (the command line) -------------------------------------------------------------


@contextmanager
def _locked(path: Path) -> Iterator[tomlkit.TOMLDocument]:
    """The file's document, locked against other editors; written back atomically on exit."""
    target = path.resolve()
    lock_path = target.with_name(f".{target.name}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            text = target.read_text(encoding="utf-8") if target.exists() else ""
        except (OSError, UnicodeDecodeError) as exc:
            raise KeysFileError(f"{path}: cannot read: {exc}") from None
        parse_keys(text, str(path))  # never edit a file that would not load
        doc = tomlkit.parse(text)
        yield doc
        new_text = tomlkit.dumps(doc)
        parse_keys(new_text, str(path))
        old = target.stat() if target.exists() else None
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(new_text)
                out.flush()
                os.fsync(out.fileno())
            if old is None:
                os.chmod(temp, 0o600)
            else:
                # The same owner, group and mode as the file it replaces: a service that reads
                # it through its group must still be able to (or a revocation would not load).
                if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                    os.chown(temp, old.st_uid, old.st_gid)
                os.chmod(temp, old.st_mode & 0o7777)
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


def _tables(doc: tomlkit.TOMLDocument, path: Path) -> list[Table]:
    keys = doc.get("key")
    if keys is None:
        return []
    if not isinstance(keys, AoT):
        raise KeysFileError(
            f"{path}: key: the command line edits [[key]] tables only; rewrite the keys as "
            "[[key]] tables to edit them with it"
        )
    return list(keys)


def append_key(
    path: Path,
    *,
    name: str,
    role: Role,
    team: str | None = None,
    models: tuple[str, ...] | None = None,
    expires: datetime | None = None,
    limits: Mapping[str, int] | None = None,
) -> tuple[str, KeyEntry]:
    """Add a new key to the file (created if absent); (the key, its entry). ``limits``:
    its own rpm, tpm and concurrency, those it sets."""
    with _locked(path) as doc:
        tables = _tables(doc, path)
        if any(t.get("name") == name for t in tables):
            raise KeysFileError(f"{path}: a key named {name!r} exists already")
        if name in RESERVED_NAMES:
            raise KeysFileError(f"{path}: {name!r} is reserved: choose another name")
        ids = {t.get("id") for t in tables}
        key, ident = new_key(lambda i: i in ids)
        table = tomlkit.table()
        table["id"] = ident
        table["name"] = name
        table["sha256"] = digest_of(key).hex()
        table["role"] = role
        if team is not None:
            table["team"] = team
        if models is not None:
            table["models"] = list(models)
        if expires is not None:
            table["expires"] = expires
        for field, value in (limits or {}).items():
            table[field] = value
        if "key" in doc:
            cast(AoT, doc["key"]).append(table)
        else:
            doc.append("key", tomlkit.aot())
            cast(AoT, doc["key"]).append(table)
    return key, parse_keys(tomlkit.dumps(doc), str(path))[-1]


def edit_key(path: Path, name: str, change: Callable[[Table], None] | None) -> None:
    """Change the entry named ``name`` in place (``change``), or remove it (None)."""
    with _locked(path) as doc:
        tables = _tables(doc, path)
        found = [i for i, table in enumerate(tables) if table.get("name") == name]
        if not found:
            raise KeysFileError(f"{path}: no key named {name!r}")
        index = found[0]
        table = tables[index]
        if change is None:
            aot = cast(AoT, doc["key"])
            del aot[index]
            if not len(aot):
                del doc["key"]
        else:
            change(table)
