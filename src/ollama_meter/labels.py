"""Bounded values for the ``model`` label.

A model name comes from a request body or path, so it is attacker-controlled and unbounded.
This module turns it into a label value from a bounded set of bounded strings:

- a name longer than ``MAX_NAME_LENGTH`` or with a character Ollama never puts in a model
  name (anything but letters, digits and ``._-:/@``) is ``other`` at once: it is never
  stripped, case-folded or kept;
- names the upstream lists in ``/api/tags`` (matched case-insensitively, as Ollama matches
  them) are always allowed, spelt as the upstream spells them;
- any other name is allowed until ``max_models`` such names have been seen, then it is
  ``other``;
- no name at all (no body, no ``model`` field, unparsable or encoded body) is ``unknown``.

So there are at most len(tags) + max_models + 2 label values, none longer than
MAX_NAME_LENGTH, and the raw-spelling cache holds at most ``_CACHE_LIMIT`` keys of at most
MAX_NAME_LENGTH characters. Pure: no I/O; ``set_known`` is fed by whoever polls ``/api/tags``.
"""

from __future__ import annotations

import re
from typing import Final

from .ollama import canonical_model

UNKNOWN: Final = "unknown"
OTHER: Final = "other"

#: Longer than any name Ollama accepts (host, namespace, model and tag are each bounded there).
MAX_NAME_LENGTH: Final = 256
# Surrounding whitespace is allowed (canonical_model strips it, as Ollama does).
_NAME: Final = re.compile(r"\s*[A-Za-z0-9._:/@-]+\s*")

# Bound on the raw-spelling cache (raw spellings are unbounded: "LLAMA3.2", "Llama3.2", ...).
_CACHE_LIMIT: Final = 4096


class ModelLabels:
    __slots__ = ("_cache", "_known", "_max_models", "_seen")

    def __init__(self, max_models: int) -> None:
        self._max_models = max_models
        self._known: dict[str, str] = {}  # casefolded canonical name -> upstream spelling
        self._seen: dict[str, str] = {}  # casefolded canonical name -> first spelling seen
        self._cache: dict[str, str] = {}  # raw name -> label, only for allowed labels

    def set_known(self, names: list[str]) -> None:
        """Replace the upstream's model list (from ``/api/tags`` or ``/api/ps``)."""
        known = {canonical_model(n).casefold(): canonical_model(n) for n in names if _is_name(n)}
        if known != self._known:
            self._known = known
            self._cache.clear()

    def label(self, name: str | None) -> str:
        if name is None:
            return UNKNOWN
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        if not _is_name(name):
            return OTHER
        canonical = canonical_model(name)
        key = canonical.casefold()
        label = self._known.get(key) or self._seen.get(key)
        if label is None:
            if len(self._seen) >= self._max_models:
                return OTHER
            label = self._seen[key] = canonical
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[name] = label
        return label


def _is_name(name: str) -> bool:
    # The length first: a huge string is rejected without being scanned.
    return len(name) <= MAX_NAME_LENGTH and _NAME.fullmatch(name) is not None
