"""The audit log: one JSON line per model-management call and per refused call.

With API keys on, ``[access] audit_log`` names a file (or ``-``, standard output) for one
line per pull, push, create, copy, delete and blob upload, and per refused call of any route.
This module owns what a line holds and how it reaches the file, not which calls are audited.

Rule 1: a line names things, never content. ``request_names`` copies only the string
fields that name a model (``model``, legacy ``name``, ``source``/``destination``, ``from``)
and a blob's digest and size, each cut to ``NAME_LIMIT`` characters; never prompts,
messages, Modelfile text, ``files`` or ``adapters``. Keys match as Go's ``encoding/json``
matches them (case-insensitively), so ``"Model"`` cannot hide the model Ollama acts on.

Rule 2: the event loop never waits on the disk. ``AuditLog.write`` appends to a list under
a lock held only for a swap; a daemon thread takes the list in batches and writes each line
with one ``os.write`` on a file opened ``O_APPEND`` (so a line is never interleaved with
another writer's). At most ``max_pending`` lines wait: past that a line is dropped, so a
client sending thousands of refused requests cannot grow memory without bound.

Rule 3: the audit log never fails a request. A line that cannot be written (dropped, or the
open or write failed) calls ``on_error`` once; only the first failure is logged, so a full
disk does not flood the log. The next line reopens the file, and starts with a newline if a
write was cut short, so a torn line never swallows it. At most once a second (per batch) the
writer checks whether the path names another file (logrotate moved it) and reopens it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Final

import orjson

OUTCOMES: Final = ("success", "error", "denied", "incomplete")
NAME_LIMIT: Final = 256
REOPEN_CHECK_SECONDS: Final = 1.0
STDOUT: Final = "-"

_log = logging.getLogger(__name__)
# The order names take in a line; nothing else from a request body is ever copied.
_NAME_ORDER: Final = ("model", "source", "destination", "from", "digest", "bytes")
# Routes whose body Ollama reads a legacy ``name`` from, when ``model`` is empty.
_LEGACY_NAME: Final = frozenset(
    {"/api/pull", "/api/push", "/api/create", "/api/delete", "/api/show"}
)
_MORE_NAMES: Final = {"/api/copy": ("source", "destination"), "/api/create": ("from",)}
_BLOB: Final = "/api/blobs/{digest}"
_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT


def request_names(
    template: str, body: bytes | None, path: str, request_bytes: int
) -> dict[str, str | int]:
    """The names a request carries, for its audit line (Rule 1). ``body`` is the JSON body
    when it was read, else None; anything unparsable names nothing. Never raises."""
    names: dict[str, str | int] = {}
    if template == _BLOB:  # the body is the blob itself: never parsed
        names["digest"] = path.rsplit("/", 1)[-1][:NAME_LIMIT]
        names["bytes"] = request_bytes
        return names
    try:
        doc = orjson.loads(body) if body is not None else None
    except orjson.JSONDecodeError:
        return names
    if not isinstance(doc, dict):
        return names
    model = _field(doc, "model")
    if model is None and template in _LEGACY_NAME:
        model = _field(doc, "name")
    found = {"model": model, **{k: _field(doc, k) for k in _MORE_NAMES.get(template, ())}}
    names.update((k, v) for k, v in found.items() if v is not None)
    return names


def _field(doc: dict[str, object], name: str) -> str | None:
    """A non-blank string field, cut to NAME_LIMIT; its key matched case-insensitively, the
    last spelling winning, as Go's encoding/json does."""
    found: object = None
    for key, value in doc.items():
        if key.casefold() == name:
            found = value
    return found[:NAME_LIMIT] if isinstance(found, str) and found.strip() else None


def audit_line(
    *,
    at: float,
    request_id: str,
    key: str,
    team: str | None,
    client: str | None,
    method: str,
    route: str,
    upstream: str,
    names: Mapping[str, str | int],
    status: int,
    duration: float,
    outcome: str,
    reason: str | None = None,
) -> bytes:
    """One line, fields in a fixed order; ``at`` is Unix time, ``reason`` why it was refused
    (``missing``, ``invalid``, ``forbidden_route``, ``forbidden_model``). Names other than
    those ``request_names`` gives are left out, so they cannot shadow a field."""
    seconds, millis = divmod(round(at * 1000), 1000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    doc: dict[str, object] = {
        "time": f"{stamp}.{millis:03d}Z",
        "request_id": request_id,
        "key": key,
        "team": team,
        "client": client,
        "method": method,
        "route": route,
        "upstream": upstream,
    }
    doc.update((name, names[name]) for name in _NAME_ORDER if name in names)
    doc.update(status=status, duration_seconds=round(duration, 6), outcome=outcome)
    if reason is not None:
        doc["reason"] = reason
    return orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)


def _open_append(path: str) -> int:
    return os.open(path, _FLAGS, 0o640)


class AuditLog:
    """Appends audit lines from a background thread (Rules 2 and 3).

    ``on_error`` is called once per lost line: from the writer thread for a failed open or
    write, from ``write`` for a dropped line; it must be thread-safe (a Counter's ``inc``).
    Test seams: ``opener`` opens the target and returns a descriptor (tests make it block),
    ``clock`` paces the rotation check (tests advance it by hand).
    """

    def __init__(
        self,
        target: str,
        on_error: Callable[[], None],
        max_pending: int = 10_000,
        *,
        opener: Callable[[str], int] = _open_append,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._target = target
        self._on_error = on_error
        self._max_pending = max_pending
        self._opener = opener
        self._clock = clock
        self._ready = threading.Condition(threading.Lock())
        self._pending: list[bytes] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        # Owned by the writer thread from here on.
        self._fd: int | None = None
        self._checked = 0.0
        self._torn = False  # a failed write left part of a line in the file
        self._warned = False

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-log", daemon=True)
            self._thread.start()

    def write(self, line: bytes) -> None:
        """Queue one line (ending in a newline). Never blocks on I/O, never raises."""
        with self._ready:
            if not self._closing and len(self._pending) < self._max_pending:
                self._pending.append(line)
                self._ready.notify()
                return
        self._on_error()  # dropped: too many waiting, or written after close()

    def close(self, timeout: float = 5.0) -> None:
        """Write every line queued before this call, then stop and close the file. Never
        started, the lines are written here, in the caller's thread."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        if self._thread is None:
            self._run()
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            _log.warning("audit log %s: lines still pending after %ss", self._target, timeout)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._closing:
                    self._ready.wait()
                batch, self._pending = self._pending, []
            if not batch:  # closing, and nothing left
                break
            self._check_rotation()
            for line in batch:
                self._write_line(line)
        self._drop_fd()

    def _check_rotation(self) -> None:
        now = self._clock()
        if self._fd is not None and now - self._checked < REOPEN_CHECK_SECONDS:
            return
        self._checked = now  # a file opened in this batch is checked a second from now
        if self._fd is None or self._target == STDOUT:
            return
        try:
            moved = not os.path.samestat(os.stat(self._target), os.fstat(self._fd))
        except FileNotFoundError:
            moved = True
        except OSError:
            return  # cannot tell: keep writing where we are
        if moved:
            self._drop_fd()
            self._torn = False  # a torn line stays in the old file

    def _write_line(self, line: bytes) -> None:
        written = 0
        try:
            if self._fd is None:
                self._fd = 1 if self._target == STDOUT else self._opener(self._target)
            # After a torn line, a newline first, so this line starts clean.
            view = memoryview(b"\n" + line if self._torn else line)
            while written < len(view):  # one write per line, unless the kernel takes less
                count = os.write(self._fd, view[written:])
                if count <= 0:
                    raise OSError(f"wrote {count} bytes")
                written += count
            self._torn = False
        except OSError as error:
            self._torn = self._torn or written > 0
            self._drop_fd()
            self._on_error()
            if not self._warned:
                self._warned = True
                _log.warning(
                    "audit log %s: %s; lines that cannot be written are counted, not logged",
                    self._target,
                    error,
                )

    def _drop_fd(self) -> None:
        """Forget the file, so the next line opens the path afresh."""
        fd, self._fd = self._fd, None
        if fd is not None and self._target != STDOUT:
            with contextlib.suppress(OSError):
                os.close(fd)
