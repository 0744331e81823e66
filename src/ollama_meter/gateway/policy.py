"""What each role may do: route classes, and the models a key may name.

Rules:
1. Every request belongs to one class, from its method and route template (ollama.py's route
   table, so a path the table does not know is ``other``):

   =========== ======================================================== =====================
   class       routes                                                   roles
   =========== ======================================================== =====================
   public      GET/HEAD ``/`` and ``/api/version``; a CORS preflight     anyone
   read        GET/HEAD tags, ps, status, /v1/models(/{model});           read, inference,
               POST /api/show; HEAD /api/blobs/{digest}                  admin
   inference   POST generate, chat, embed, embeddings and the /v1          inference, admin
               inference routes
   model admin POST pull, push, create, copy, blobs; DELETE /api/delete admin
   account     /api/me, /api/signout, /api/experimental/*, /api/user/*  admin
   other       anything else (another method, an unknown path)          admin
   =========== ======================================================== =====================

   A CORS preflight (OPTIONS with ``Origin`` and ``Access-Control-Request-Method``, and no
   body) is public because a browser never sends credentials with one and it runs nothing:
   Ollama answers it from its CORS middleware. Any other OPTIONS is classed by its path.
2. A key's ``models`` globs apply to inference only. A name matches as Ollama compares names
   (``llama3`` is ``llama3:latest``, case-insensitively): a pattern without wildcards is one
   model, ``llama3*`` every name that starts so.

3. The model a key's list is checked against is the one Ollama will run: Go's JSON decoder
   matches keys case-insensitively and keeps the last, so ``{"model": "qwen3", "MODEL":
   "llama3"}`` runs llama3. A body that spells ``model`` more than one way is refused
   rather than guessed at.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Final

import orjson

from ..labels import MAX_NAME_LENGTH
from ..ollama import canonical_model
from .keys import Role


class RouteClass(enum.Enum):
    PUBLIC = "public"
    READ = "read"
    INFERENCE = "inference"
    MODEL_ADMIN = "model_admin"
    ACCOUNT = "account"
    OTHER = "other"


_ANY_ROLE: Final[frozenset[Role]] = frozenset({"read", "inference", "admin"})
_USERS: Final[frozenset[Role]] = frozenset({"inference", "admin"})
_ADMIN: Final[frozenset[Role]] = frozenset({"admin"})

#: The roles allowed in each class (public: anyone, also without a role).
ALLOWED: Final[dict[RouteClass, frozenset[Role]]] = {
    RouteClass.PUBLIC: _ANY_ROLE,
    RouteClass.READ: _ANY_ROLE,
    RouteClass.INFERENCE: _USERS,
    RouteClass.MODEL_ADMIN: _ADMIN,
    RouteClass.ACCOUNT: _ADMIN,
    RouteClass.OTHER: _ADMIN,
}

_GET: Final = ("GET", "HEAD")


def _table() -> dict[tuple[str, str], RouteClass]:
    table: dict[tuple[str, str], RouteClass] = {}

    def add(cls: RouteClass, methods: tuple[str, ...], *templates: str) -> None:
        for template in templates:
            for method in methods:
                table[method, template] = cls

    add(RouteClass.PUBLIC, _GET, "/", "/api/version")
    add(RouteClass.READ, _GET, "/api/tags", "/api/ps", "/api/status", "/v1/models")
    add(RouteClass.READ, _GET, "/v1/models/{model}")
    add(RouteClass.READ, ("POST",), "/api/show")
    add(RouteClass.READ, ("HEAD",), "/api/blobs/{digest}")
    add(
        RouteClass.INFERENCE,
        ("POST",),
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
        "/v1/audio/transcriptions",
    )
    add(
        RouteClass.MODEL_ADMIN,
        ("POST",),
        "/api/pull",
        "/api/push",
        "/api/create",
        "/api/copy",
        "/api/blobs/{digest}",
    )
    add(RouteClass.MODEL_ADMIN, ("DELETE",), "/api/delete")
    return table


_CLASSES: Final = _table()
_ACCOUNT: Final = frozenset(
    {
        "/api/me",
        "/api/signout",
        "/api/experimental/web_search",
        "/api/experimental/web_fetch",
        "/api/experimental/model-recommendations",
        "/api/user/keys/{key}",
    }
)


def route_class(method: str, template: str, preflight: bool = False) -> RouteClass:
    """The class of a request (``template``: its ollama.Route template; ``preflight``: it is
    a CORS preflight, see rule 1)."""
    found = _CLASSES.get((method, template))
    if found is not None:
        return found
    if preflight and method == "OPTIONS":
        return RouteClass.PUBLIC
    return RouteClass.ACCOUNT if template in _ACCOUNT else RouteClass.OTHER


def is_preflight(method: str, has: Callable[[str], bool]) -> bool:
    """A CORS preflight: OPTIONS with Origin and Access-Control-Request-Method, no body."""
    return (
        method == "OPTIONS"
        and has("Origin")
        and has("Access-Control-Request-Method")
        and not has("Content-Length")
        and not has("Transfer-Encoding")
    )


def allows(role: Role | None, cls: RouteClass) -> bool:
    if cls is RouteClass.PUBLIC:
        return True
    return role is not None and role in ALLOWED[cls]


_WILDCARDS: Final = frozenset("*?[")


@lru_cache(maxsize=4096)
def _pattern(pattern: str) -> tuple[bool, str]:
    """(is a glob, the form compared): a plain name is spelt as /api/tags spells it."""
    if _WILDCARDS & set(pattern):
        return True, pattern.casefold()
    return False, canonical_model(pattern).casefold()


def model_allowed(patterns: tuple[str, ...] | None, model: str | None) -> bool:
    """May a key with these ``models`` patterns name ``model`` (None: not known)?"""
    if patterns is None:
        return True
    if model is None or len(model) > MAX_NAME_LENGTH:
        return False
    name = canonical_model(model).casefold()
    bare = name.removesuffix(":latest")
    for pattern in patterns:
        is_glob, form = _pattern(pattern)
        if is_glob:
            if fnmatchcase(name, form) or fnmatchcase(bare, form):
                return True
        elif form == name:
            return True
    return False


#: The body names its model under several spellings (see rule 3).
AMBIGUOUS: Final = "\x00ambiguous"


def model_ollama_runs(body: bytes | None) -> str | None:
    """The ``model`` of an inference body as Ollama's decoder reads it; None if it names
    none (or is not a JSON object), AMBIGUOUS if it spells the key several ways."""
    if body is None:
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    spellings = [key for key in doc if key.casefold() == "model"]
    if len(spellings) > 1:
        return AMBIGUOUS
    value = doc.get(spellings[0]) if spellings else None
    return value if isinstance(value, str) else None
