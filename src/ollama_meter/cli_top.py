"""``ollama-meter top``: a running proxy's ``/-/status.json`` as a live terminal view.

Owns fetching the document, the terminal (full screen, cbreak mode, the ``q`` key) and what
the command prints and exits with; what the view shows is status/terminal.py's. It talks
only to the proxy (``--url``), with an admin key when access control is on (``--key`` or
``OLLAMA_METER_KEY``, sent as ``Authorization: Bearer``).

On a terminal the view refreshes every second until ``q`` or Ctrl-C (exit 0); a fetch that
fails after one that worked leaves the last data on screen, marked stale, and the next
second tries again. Anywhere else (a pipe, a file) it fetches once and prints plain text.
A first fetch that fails is one line on stderr and exit status 1.
"""

from __future__ import annotations

import http.client
import os
import select
import signal
import sys
import termios
import time
import tty
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final, NoReturn

import click
import orjson

from .cli_client import key_option, url_option

_REFRESH: Final = 1.0  # seconds between polls
# The proxy builds the document in milliseconds; past this it is as good as unreachable,
# and ``q`` is read between fetches, so this is also the longest a quit can take.
_TIMEOUT: Final = 3.0
_PLAIN_WIDTH: Final = 100
_PATH: Final = "/-/status.json"
#: The largest document read: a busy fleet's is well under a megabyte.
_MAX_BODY: Final = 16 << 20
#: The most of an error answer read (its message is a line).
_MAX_ERROR: Final = 64 << 10


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """The proxy never redirects /-/status.json: a 3xx is an answer, never followed (urllib
    would send the key's header on to wherever it points)."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


# No proxy from the environment (http_proxy, ...) and no redirects: the admin key goes to --url
# and nowhere else, as with the other commands' aiohttp clients, which do not read those
# variables.
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())

Doc = dict[str, object]


class FetchError(Exception):
    """A fetch that gave no document; its text is the one line the user reads."""


def _printable(text: str, limit: int = 200) -> str:
    """What came from the far end, fit for one line of a terminal: no escape sequence, no
    carriage return, and not a screenful."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _reason(error: object) -> str:
    """``connection refused`` from ConnectionRefusedError(111, 'Connection refused')."""
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return _printable(error.strerror[:1].lower() + error.strerror[1:])
    # (http.client's BadStatusLine is the line the far end sent.)
    return _printable(str(error)) or type(error).__name__


def _answer_error(body: bytes) -> str:
    """The proxy's own message in an error answer ({"error": "..."}), else its first bytes."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    message = doc.get("error") if isinstance(doc, dict) else None
    return _printable(message if isinstance(message, str) else repr(body[:80]))


def _refused(url: str, status: int, body: bytes, key: str | None) -> str:
    said = _answer_error(body)
    if status == 401 and key is None:
        return f"{url} needs an admin key: give --key or set OLLAMA_METER_KEY (401: {said})"
    if status == 401:
        return f"{url} refused the key given (401: {said})"
    if status == 403:
        return f"{url} refused the key: {_PATH} needs an admin key (403: {said})"
    if status == 404:
        return f"{url} has no {_PATH} (404): is it ollama-meter, with the status page?"
    if 300 <= status < 400:
        return f"{url}{_PATH} answered {status}, a redirect (not followed): give --url the proxy"
    return f"{url}{_PATH} answered {status}: {said}"


def fetch(url: str, key: str | None, timeout: float = _TIMEOUT) -> Doc:
    """The decoded document, or FetchError saying why not (not its version: the view
    shows a version it does not know as a message of its own).

    The standard library's client, not aiohttp: this is one GET a second from a plain loop
    that also waits on the keyboard, and urllib does that with a timeout and no event loop
    to start for each fetch or to share with stdin."""
    headers = {"Accept": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url + _PATH, headers=headers)
    # ``timeout`` bounds each wait on the socket; this, the whole body (a far end that sends
    # a byte a second would otherwise hold the fetch, and the q key, for as long as it likes).
    deadline = time.monotonic() + timeout
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            body = _read(response, _MAX_BODY, deadline, url)
    except urllib.error.HTTPError as exc:
        with exc:
            said = _read(exc, _MAX_ERROR, deadline, url, whole=False)
            raise FetchError(_refused(url, exc.code, said, key)) from None
    except urllib.error.URLError as exc:
        raise FetchError(f"cannot reach {url}: {_reason(exc.reason)}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise FetchError(f"cannot reach {url}: {_reason(exc)}") from None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise FetchError(f"{url}{_PATH} did not answer JSON: {body[:60]!r}") from None
    if not isinstance(doc, dict):
        raise FetchError(f"{url}{_PATH} answered JSON that is not an object")
    return doc


def _read(
    response: http.client.HTTPResponse | urllib.error.HTTPError,
    limit: int,
    deadline: float,
    url: str,
    *,
    whole: bool = True,
) -> bytes:
    """At most ``limit`` bytes of the body, before ``deadline``. ``whole``: a body past the
    limit is an error; otherwise it is cut there."""
    chunks, size = [], 0
    while chunk := response.read1(65536):
        if time.monotonic() > deadline:
            raise FetchError(f"cannot reach {url}: timed out reading {_PATH}")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            if whole:
                raise FetchError(f"{url}{_PATH} is too large (over {limit >> 20} MB)")
            break
    return b"".join(chunks)[:limit]


def _base(url: str) -> str:
    """``host:port`` means http; the path of the proxy's base is kept, its last ``/`` not."""
    return (url if "://" in url else f"http://{url}").rstrip("/")


def _fail(message: str) -> NoReturn:
    click.echo(f"ollama-meter top: {message}", err=True)
    sys.exit(1)


def _plain_width() -> int:
    try:
        width = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        return _PLAIN_WIDTH
    return width if width > 0 else _PLAIN_WIDTH


class _Keyboard:
    """Waits for the ``q`` key on a terminal in cbreak mode (keys arrive one by one,
    unechoed; Ctrl-C still interrupts), or just waits when stdin is not a terminal."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def quit_within(self, seconds: float) -> bool:
        """True as soon as ``q`` is pressed; False once ``seconds`` are over."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.fd is None:
                time.sleep(left)
                break
            readable, _, _ = select.select([self.fd], [], [], left)
            if readable:
                typed = os.read(self.fd, 64)
                if not typed:  # stdin closed: nothing more to read, wait out the time
                    self.fd = None
                elif b"q" in typed or b"Q" in typed:
                    return True
        return False


@contextmanager
def _keyboard() -> Iterator[_Keyboard]:
    """cbreak mode for as long as the view runs, the terminal as it was afterwards,
    whatever ends it (``q``, Ctrl-C, SIGTERM, SIGHUP, an exception)."""

    def leave(signum: int, _: object) -> None:
        sys.exit(128 + signum)  # SystemExit unwinds through the restore below

    previous = {s: signal.signal(s, leave) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        stdin = sys.stdin
        if stdin is None or not stdin.isatty():
            yield _Keyboard(None)
            return
        fd = stdin.fileno()
        saved = termios.tcgetattr(fd)
        try:
            tty.setcbreak(fd, termios.TCSANOW)
            yield _Keyboard(fd)
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _proxy_now(doc: Doc, since: float = 0.0) -> float:
    """Now on the proxy's clock: its ``generated_at`` plus ``since``, the seconds since the
    answer came. Relative times ("unloads in 4m00s", "12s ago") are then right however far
    this machine's clock is from the proxy's, and keep counting while the data is stale."""
    generated = doc.get("generated_at")
    if isinstance(generated, int | float) and not isinstance(generated, bool):
        return float(generated) + since
    return time.time()


def _live(url: str, key: str | None, doc: Doc) -> int:
    """The full-screen view until ``q`` or Ctrl-C; 1 if it ended on a document of a
    version it cannot draw, else 0."""
    from rich.console import Console
    from rich.live import Live

    from .status.terminal import render, version_problem

    received, error = time.monotonic(), None
    with (
        _keyboard() as keyboard,
        Live(console=Console(), screen=True, auto_refresh=False) as live,
    ):
        while True:
            started = time.monotonic()
            now = _proxy_now(doc, time.monotonic() - received)
            live.update(render(doc, now, error=error), refresh=True)
            if keyboard.quit_within(_REFRESH - (time.monotonic() - started)):
                break
            try:
                doc = fetch(url, key)
            except FetchError as exc:
                error = str(exc)
            else:
                received, error = time.monotonic(), None
    return 1 if version_problem(doc) is not None else 0


@click.command("top")
@url_option
@key_option
def top_command(url: str, key: str | None) -> None:
    """The fleet, models, keys and problems of a running proxy, live (like htop): `q` or
    Ctrl-C quits. Not on a terminal: printed once, as plain text."""
    # The view's modules (and rich) load here, not when `ollama-meter` starts a proxy.
    from .status.terminal import render_plain, version_problem

    base = _base(url)
    try:
        doc = fetch(base, key)
    except FetchError as exc:
        _fail(str(exc))
    problem = version_problem(doc)
    if not sys.stdout.isatty():
        if problem is not None:
            _fail(problem)
        click.echo(render_plain(doc, _proxy_now(doc), _plain_width()), nl=False)
        return
    try:
        status = _live(base, key, doc)
    except KeyboardInterrupt:
        status = 0
    sys.exit(status)
