"""The answers a fleet gives as a whole, to the routes that name no model.

``/api/tags`` and ``/v1/models`` are the union of the healthy upstreams' lists, one entry per
name (compared as Ollama compares names), each the first holder's entry as it sent it, in
the fleet's order; ``/api/ps`` is the concatenation (the same model loaded on two servers is
two entries). Pure: it merges answers already received, and a body it cannot read adds
nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import orjson

from .router import model_key

TAGS: Final = "/api/tags"
PS: Final = "/api/ps"
V1_MODELS: Final = "/v1/models"
#: Route templates the fleet answers as a whole.
FLEET_WIDE: Final = frozenset({TAGS, PS, V1_MODELS})


def _list(body: bytes, field: str) -> list[Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    items = doc.get(field) if isinstance(doc, dict) else None
    return items if isinstance(items, list) else []


def _unique(entries: Sequence[list[Any]], name_field: str) -> list[Any]:
    seen: set[str] = set()
    merged = []
    for items in entries:
        for item in items:
            name = item.get(name_field) if isinstance(item, dict) else None
            if not isinstance(name, str):
                continue
            key = model_key(name)
            if key not in seen:
                seen.add(key)
                merged.append(item)
    return merged


def merge(template: str, bodies: Sequence[bytes]) -> bytes:
    """The fleet's answer on ``template`` from each healthy upstream's 2xx body, in order."""
    if template == V1_MODELS:
        data = _unique([_list(b, "data") for b in bodies], "id")
        return orjson.dumps({"object": "list", "data": data}) + b"\n"
    if template == TAGS:
        return orjson.dumps({"models": _unique([_list(b, "models") for b in bodies], "name")})
    return orjson.dumps({"models": [m for b in bodies for m in _list(b, "models")]})
