"""How Ollama's Go JSON decoding rejects a request body, worded as Ollama words it.

The fake Ollama uses this so that a bad body gets the real server's error text. Ollama reads
one JSON value with a decoder (anything after that value is ignored) into a request struct:

- no value at all (an empty or blank body): ``EmptyBody`` (Ollama: "missing request body",
  or "EOF" on /v1);
- the body ends inside the value: "unexpected EOF";
- a syntax error: "invalid character 'x' <where>", in Go's words for where it was;
- a value that is not an object (null decodes to an empty struct), or a field of the wrong
  type among those named: "json: cannot unmarshal <kind> into Go ...".

Each wording was checked against Ollama v0.33.0-rc2 (built with Go 1.27). Not reproduced:
type errors of fields other than the ones passed in ``fields``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

_SPACE: Final = b" \t\r\n"
_LITERALS: Final = {ord("t"): b"true", ord("f"): b"false", ord("n"): b"null"}
_ESCAPES: Final = frozenset(b'"\\/bfnrt')
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_GO_ESCAPES: Final = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r"}
_GO_ESCAPES_MORE: Final = {"\t": "\\t", "\v": "\\v", "\\": "\\\\", "'": "\\'"}
_NO_FIELDS: Final[Mapping[str, type]] = MappingProxyType({})


class DecodeError(Exception):
    """The body cannot become the request struct; ``str()`` is Go's message."""


class EmptyBody(DecodeError):
    """No JSON value at all."""


def kind(value: object) -> str:
    """Go's name for the JSON kind of a decoded value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def decode(body: bytes, go_type: str, fields: Mapping[str, type] = _NO_FIELDS) -> dict[str, Any]:
    """The object ``body`` holds, as a ``go_type`` (``api.ChatRequest``) would take it.

    ``fields`` maps JSON keys to the Python type Go's field has (str or bool), to reject a
    value of another kind the way Go does.
    """
    end = _Scanner(body).value_end()
    try:
        value = json.loads(body[:end])
    except (UnicodeDecodeError, ValueError):  # invalid UTF-8: Go substitutes U+FFFD
        value = json.loads(body[:end].decode(errors="replace"))
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DecodeError(f"json: cannot unmarshal {kind(value)} into Go value of type {go_type}")
    struct = go_type.rpartition(".")[2]
    for key, item in value.items():
        wanted = fields.get(key)
        if wanted is not None and item is not None and type(item) is not wanted:
            go_kind = "string" if wanted is str else "bool"
            raise DecodeError(
                f"json: cannot unmarshal {kind(item)} into Go struct field "
                f"{struct}.{key} of type {go_kind}"
            )
    return value


def _quote_char(data: bytes, pos: int) -> str:
    """Go's quoting of the character at ``pos`` in a syntax error: 'x', '\\n', '\\xff'."""
    for size in (1, 2, 3, 4):
        try:
            char = data[pos : pos + size].decode()
        except UnicodeDecodeError:
            continue
        break
    else:
        return f"'\\x{data[pos]:02x}'"
    if char in _GO_ESCAPES or char in _GO_ESCAPES_MORE:
        return f"'{_GO_ESCAPES.get(char) or _GO_ESCAPES_MORE[char]}'"
    if char == '"':
        return "'\"'"
    if not char.isprintable():
        return f"'\\x{ord(char):02x}'" if ord(char) < 0x80 else f"'\\u{ord(char):04x}'"
    return f"'{char}'"


class _Scanner:
    """Finds where the first JSON value of a body ends, or raises Go's error for it."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def value_end(self) -> int:
        self._skip_space()
        if self.pos == len(self.data):
            raise EmptyBody("EOF")
        self._value("looking for beginning of value")
        return self.pos

    def _fail(self, where: str) -> DecodeError:
        if self.pos >= len(self.data):
            return DecodeError("unexpected EOF")
        return DecodeError(f"invalid character {_quote_char(self.data, self.pos)} {where}")

    def _peek(self) -> int | None:
        return self.data[self.pos] if self.pos < len(self.data) else None

    def _skip_space(self) -> None:
        while self.pos < len(self.data) and self.data[self.pos] in _SPACE:
            self.pos += 1

    def _value(self, where: str) -> None:
        self._skip_space()
        char = self._peek()
        if char == ord("{"):
            self._object()
        elif char == ord("["):
            self._array()
        elif char == ord('"'):
            self._string()
        elif char is not None and (char == ord("-") or ord("0") <= char <= ord("9")):
            self._number()
        elif char in _LITERALS:
            self._literal(_LITERALS[char])
        else:
            raise self._fail(where)

    def _object(self) -> None:
        self.pos += 1
        self._skip_space()
        if self._peek() == ord("}"):
            self.pos += 1
            return
        while True:
            self._skip_space()
            if self._peek() != ord('"'):
                raise self._fail("looking for beginning of object key string")
            self._string()
            self._skip_space()
            if self._peek() != ord(":"):
                raise self._fail("after object key")
            self.pos += 1
            self._value("looking for beginning of value")
            self._skip_space()
            if self._peek() == ord(","):
                self.pos += 1
            elif self._peek() == ord("}"):
                self.pos += 1
                return
            else:
                raise self._fail("after object key:value pair")

    def _array(self) -> None:
        self.pos += 1
        self._skip_space()
        if self._peek() == ord("]"):
            self.pos += 1
            return
        while True:
            self._value("looking for beginning of value")
            self._skip_space()
            if self._peek() == ord(","):
                self.pos += 1
            elif self._peek() == ord("]"):
                self.pos += 1
                return
            else:
                raise self._fail("after array element")

    def _string(self) -> None:
        self.pos += 1
        while (char := self._peek()) != ord('"'):
            if char is None or char < 0x20:
                raise self._fail("in string")
            if char == ord("\\"):
                self._escape()
            else:
                self.pos += 1
        self.pos += 1

    def _escape(self) -> None:
        code = self.data[self.pos + 1 : self.pos + 2]
        if not code:
            raise DecodeError("unexpected EOF")
        if code[0] in _ESCAPES:
            self.pos += 2
            return
        sequence = (
            self.data[self.pos : self.pos + 6]
            if code == b"u"
            else self.data[self.pos : self.pos + 2]
        )
        if code == b"u":
            if len(sequence) < 6:
                raise DecodeError("unexpected EOF")
            if all(c in _HEX for c in sequence[2:]):
                self.pos += 6
                return
        shown = sequence.decode(errors="replace")
        raise DecodeError(f"invalid escape sequence `{shown}` in string")

    def _number(self) -> None:
        if self._peek() == ord("-"):
            self.pos += 1
        if self._peek() == ord("0"):
            self.pos += 1
        else:
            self._digits()
        if self._peek() == ord("."):
            self.pos += 1
            self._digits()
        if self._peek() in (ord("e"), ord("E")):
            self.pos += 1
            if self._peek() in (ord("+"), ord("-")):
                self.pos += 1
            self._digits()

    def _digits(self) -> None:
        start = self.pos
        while (char := self._peek()) is not None and ord("0") <= char <= ord("9"):
            self.pos += 1
        if self.pos == start:
            raise self._fail("in numeric literal")

    def _literal(self, word: bytes) -> None:
        for offset in range(1, len(word)):
            self.pos += 1
            if self._peek() != word[offset]:
                expected = chr(word[offset])
                raise self._fail(f"in literal {word.decode()} (expecting '{expected}')")
        self.pos += 1
