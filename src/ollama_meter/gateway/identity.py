"""Who a request is: the key it carries, checked against the keys in force.

Rules:
1. A client sends its key the way its tooling can: ``Authorization: Bearer KEY`` (the
   ollama and openai SDKs, curl -H), ``Authorization: Basic`` with the key as the password
   (``curl -u any:KEY``; the user name when the password is empty), or ``x-api-key: KEY``
   (Anthropic-style clients). ``Authorization`` wins when both are sent; two
   ``Authorization`` headers are refused (which one would a server behind believe?).
2. ``authenticate`` answers with the key's entry or why not (``missing``, ``invalid``,
   ``disabled``, ``expired``). It costs a length check, a regular expression, a dict lookup
   and one SHA-256 of 55 bytes; it reads the clock through its argument.
3. ``KeyRing`` is immutable: a reload builds a new one and swaps it in whole, so a request
   never sees half of an old file and half of a new one.
"""

from __future__ import annotations

import binascii
import hmac
from base64 import b64decode
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Final

from multidict import CIMultiDictProxy

from .keys import KeyEntry, Role, digest_of, key_id

MISSING: Final = "missing"
INVALID: Final = "invalid"
DISABLED: Final = "disabled"
EXPIRED: Final = "expired"

ANONYMOUS: Final = "anonymous"

_AUTHORIZATION: Final = "Authorization"
_API_KEY: Final = "x-api-key"
#: Longest credential header looked at; anything longer is invalid without being decoded.
_MAX_CREDENTIAL: Final = 512


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request is: a key, or anonymous (with the role anonymous clients get)."""

    name: str
    team: str | None
    role: Role | None  # None: anonymous clients may do nothing beyond the public routes
    models: tuple[str, ...] | None = None
    #: Whether this is a key (not anonymous), its digest and state.
    keyed: bool = False
    digest: bytes = b""
    disabled: bool = False
    expires: float | None = None
    #: The key's own limits (keys.KeyEntry), resolved against the defaults by limits.py.
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None

    @classmethod
    def of(cls, entry: KeyEntry) -> Identity:
        return cls(
            entry.name,
            entry.team,
            entry.role,
            entry.models,
            True,
            entry.digest,
            entry.disabled,
            entry.expires,
            entry.rpm,
            entry.tpm,
            entry.concurrency,
        )

    def with_role(self, role: Role) -> Identity:
        return replace(self, role=role)


def credential(headers: CIMultiDictProxy[str]) -> str | None:
    """The key a request carries (not checked), None without one, or "" when a credential
    header is present but cannot hold a key."""
    values = headers.getall(_AUTHORIZATION, ())
    if len(values) > 1:
        return ""
    if values:
        return _from_authorization(values[0])
    api_key = headers.get(_API_KEY)
    if api_key is None:
        return None
    return api_key.strip() if len(api_key) <= _MAX_CREDENTIAL else ""


def _from_authorization(value: str) -> str:
    if len(value) > _MAX_CREDENTIAL:
        return ""
    scheme, _, token = value.strip().partition(" ")
    scheme = scheme.lower()
    token = token.strip()
    if scheme == "bearer":
        return token
    if scheme == "basic":
        try:
            decoded = b64decode(token, validate=True).decode()
        except (binascii.Error, ValueError):  # not base64, not ASCII, not UTF-8
            return ""
        user, _, password = decoded.partition(":")
        return password or user
    return ""


class KeyRing:
    """The keys in force, by id, each with the Identity its requests have."""

    __slots__ = ("_by_id", "entries")

    def __init__(self, entries: Iterable[KeyEntry]) -> None:
        self.entries = tuple(entries)
        self._by_id = {entry.id: Identity.of(entry) for entry in self.entries}

    def __len__(self) -> int:
        return len(self.entries)

    def matching(self, key: str) -> Identity | None:
        """The identity whose secret ``key`` is, working or not."""
        ident = key_id(key)
        if ident is None:
            return None
        identity = self._by_id.get(ident)
        if identity is None or not hmac.compare_digest(digest_of(key), identity.digest):
            return None
        return identity

    def authenticate(self, key: str | None, now: float) -> Identity | str:
        """The identity of a working key, else the reason it does not work."""
        if key is None:
            return MISSING
        identity = self.matching(key)
        if identity is None:
            return INVALID
        if identity.disabled:
            return DISABLED
        if identity.expires is not None and now >= identity.expires:
            return EXPIRED
        return identity
