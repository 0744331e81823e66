"""aiohttp's client request and response objects, made ready to keep their attributes inline
before the upstream session sends anything.

Why. CPython (3.11 and later) keeps an instance's attributes in a compact array when their
names are in a table that its class shares with every instance (the "shared keys"). That table
takes a new name only while the class has made few instances: each instance made leaves room
for one name fewer, until one is left, and it holds 30 names at most. An instance that sets a
name the table lacks moves all its attributes into a dict of its own, and every later store
and load on it is slower.

aiohttp's ``ClientRequest`` and ``ClientResponse`` set their names over a request's life, some
only once the response head has come (``_raw_headers``, ``_protocol``, ...) and some only when
the request has a body (the task that writes it, the response's ``_stream_writer``). When the
session's first requests are bodiless GETs made several at once (the fleet's first poll asks
each upstream three things at once; a scrape asks ``/api/ps``; a client lists ``/api/tags``),
the table has no room left for the late names, and every request after that pays for two
dicts, for the life of the process. Counted with callgrind (docs/benchmarks.md, "Fleet"): 2
dicts and 21 attribute stores into them a request, which the fleet paid and one upstream did
not, only because the fleet's first poll made nine requests at once.

So ``warm_up`` makes one instance of each class, never initialised, and sets on it every name
that a request with a body leaves on it (``NAMES``): from then on they are in the table,
whatever comes first. It changes no behaviour: the instance is dropped at once, and the names
it sets are only the table's. A name this aiohttp does not use costs a place in the table and
nothing else; tests/test_client_warmup.py checks, in a fresh interpreter, that the proxy's
requests keep their attributes inline after such a burst, and that ``NAMES`` is what this
aiohttp sets.

It knows nothing of Ollama or of the proxy; app.py calls it before creating the session.
"""

from __future__ import annotations

from typing import Final

from aiohttp import ClientRequest, ClientResponse

#: Every attribute a request with a body leaves on each (aiohttp 3.14; private names mangled).
NAMES: Final[tuple[tuple[type[object], tuple[str, ...]], ...]] = (
    (
        ClientRequest,
        (
            "method", "original_url", "url", "version", "headers", "loop", "response_class",
            "_session", "_timer", "_traces", "_ssl", "server_hostname", "proxy", "proxy_auth",
            "proxy_headers", "_body", "chunked", "compress", "length", "_upload_tracker",
            "response", "_ClientRequest__writer",
        ),
    ),
    (
        ClientResponse,
        (
            "method", "_real_url", "_url", "_request_info", "_timer", "_cache", "_traces",
            "_loop", "_session", "_resolve_charset", "_stream_writer", "_output_size",
            "_ClientResponse__writer", "_connection", "_protocol", "version", "status",
            "reason", "_headers", "_raw_headers", "content", "_history", "_body", "_closed",
            "_released", "_in_context",
        ),
    ),
)  # fmt: skip


def warm_up() -> None:
    """Put ``NAMES`` in their classes' shared keys (once is enough; more is harmless)."""
    for cls, names in NAMES:
        instance = object.__new__(cls)  # no __init__: nothing opened, nothing to close
        for name in names:
            object.__setattr__(instance, name, None)  # the name is in the table from here
            object.__delattr__(instance, name)  # (and the instance reads its defaults again)
