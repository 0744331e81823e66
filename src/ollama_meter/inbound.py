"""The client's side of a request: which request heads are accepted, and the head sent upstream.

Rules:
1. A request target passes as the client wrote it (origin-form), except an absolute-form
   target (``GET http://host/path``, which servers must accept, RFC 9112 §3.2.2): only its
   path and query go upstream, and its authority is the request's host.
2. With a base path in ``--upstream``, a target with dot segments (``/../admin``, also
   percent-encoded or with ``;`` parameters) or encoded separators is refused: appended to
   the base path, it could leave it.
3. Headers pass unchanged except: hop-by-hop ones (RFC 9110 §7.6.1) and those ``Connection``
   names; ``Expect`` (the proxy's server answers ``100-continue`` itself, so the upstream must
   not be asked to answer it a second time); ``Host`` (the upstream's, unless
   --preserve-host); ``X-Forwarded-For`` (the peer is appended); ``X-Forwarded-Proto``,
   ``-Host`` and ``-Port``, believed only from a trusted proxy (--trusted-proxies), replaced
   (Proto) or removed (Host, Port) for anyone else; with access control on,
   ``Authorization`` and ``x-api-key`` (the client's key is for the proxy, never Ollama's).
4. What cannot be forwarded intact is refused rather than changed: a header value that is not
   UTF-8 (the client's HTTP writer can only send text), and a transfer coding other than
   ``chunked`` (RFC 9112 §6.1: 501).

Every refusal is a ``Refusal`` carrying its status; proxy.py renders it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Final
from urllib.parse import unquote

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from .config import IPNetwork

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Answered or replaced by the proxy itself, never forwarded as the client sent them.
_REQUEST_ONLY: Final = HOP_BY_HOP | {"expect"}
# With access control on, the client's key stays with the proxy.
_CREDENTIALS: Final = frozenset({"authorization", "x-api-key"})
# Believed only from a trusted proxy, with every other X-Forwarded-* but -For (Proto is then
# set from what the proxy saw).
_UNTRUSTED: Final = frozenset({"forwarded", "x-real-ip"})

_ENCODED_SEPARATOR: Final = re.compile(r"%(?:2f|5c)", re.IGNORECASE)
_DOTS: Final = frozenset({".", ".."})


class Refusal(Exception):
    """A request the proxy answers itself, before anything goes upstream.

    ``message`` None means an empty body (Ollama's own 403 for a foreign Host has none).
    ``headers`` go with the answer (``WWW-Authenticate``, ``Retry-After``); ``reason`` is a
    fixed word for metrics and the audit log (``missing``, ``forbidden_route``, ...).
    """

    def __init__(
        self,
        status: int,
        message: str | None,
        headers: Mapping[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message or str(status))
        self.status = status
        self.message = message
        self.headers = headers
        self.reason = reason


def target_of(request: web.BaseRequest) -> tuple[str, str]:
    """(the target to append to the upstream's base, the host the request is for)."""
    target = request.raw_path
    if target.startswith("/"):
        return target, request.headers.get(hdrs.HOST, "")
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise Refusal(400, "ollama-meter: the request target must be a path")
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:end], rest[end:]
    if not path.startswith("/"):
        path = "/" + path
    return path, authority


def check_base_path(target: str) -> None:
    """Refuse what could climb out of the upstream's base path: a dot segment, as written or
    percent-encoded, also with ``;`` parameters (``/..;/``), and an encoded slash or a
    backslash (``..%2f``, ``..\\``), which a server behind may treat as a separator."""
    path = target.partition("?")[0]
    if "\\" in path or _ENCODED_SEPARATOR.search(path):
        raise Refusal(400, "ollama-meter: encoded slashes and backslashes are not allowed")
    for segment in path.split("/"):
        if unquote(segment.partition(";")[0]) in _DOTS:
            raise Refusal(400, "ollama-meter: dot segments are not allowed in the path")


def _with_connection(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> frozenset[str]:
    """``drop`` and the headers the Connection header names (they are hop-by-hop too)."""
    connection = headers.get(hdrs.CONNECTION)
    if connection:
        return drop | {token.strip().lower() for token in connection.split(",")}
    return drop


def filtered_headers(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    """Headers minus ``drop`` (lowercase names) and those the Connection header names."""
    drop = _with_connection(headers, drop)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


def _not_text(name: str) -> Refusal:
    return Refusal(400, f"ollama-meter: header {name!r} is not valid UTF-8")


def _is_utf8(value: str) -> bool:
    # aiohttp decodes header bytes that are not UTF-8 as surrogates, and its writer drops
    # them: forwarding would silently change the value.
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_transfer_coding(coding: str) -> None:
    """The request's Transfer-Encoding, if it has one."""
    if coding.strip().lower() != "chunked":
        raise Refusal(501, "ollama-meter: only the chunked transfer coding is supported")


class HeadWriter:
    """Builds the request head sent upstream (rule 3)."""

    __slots__ = ("_drop", "_drop_untrusted", "_trusted")

    def __init__(
        self,
        preserve_host: bool,
        trusted: tuple[IPNetwork, ...],
        drop_credentials: bool = False,
        drop: frozenset[str] = frozenset(),
    ) -> None:
        """``drop``: more headers (lowercase) that are for the proxy only."""
        drop = drop | (_REQUEST_ONLY | _CREDENTIALS if drop_credentials else _REQUEST_ONLY)
        self._drop = drop if preserve_host else drop | {"host"}
        self._drop_untrusted = self._drop | _UNTRUSTED
        self._trusted = trusted

    def headers(self, request: web.BaseRequest) -> tuple[CIMultiDict[str], str, str | None]:
        """(the headers to send upstream, the request's Host, its Transfer-Encoding)."""
        received = request.headers
        peer = request.remote
        trusted = self._is_trusted(peer)
        drop = _with_connection(received, self._drop if trusted else self._drop_untrusted)
        # One pass: filter, note Host and Transfer-Encoding, and refuse what cannot be
        # forwarded intact.
        headers: CIMultiDict[str] = CIMultiDict()
        host = ""
        coding: str | None = None
        for name, value in received.items():
            if not value.isascii() and not _is_utf8(value):
                raise _not_text(name)
            lower = name.lower()
            if lower == "host":
                host = value
            elif lower == "transfer-encoding":
                coding = value
            if lower in drop or (
                not trusted and lower.startswith("x-forwarded-") and lower != "x-forwarded-for"
            ):
                continue
            headers.add(name, value)
        if peer:
            prior = received.getall(hdrs.X_FORWARDED_FOR, [])
            headers[hdrs.X_FORWARDED_FOR] = ", ".join([*prior, peer])
        if not trusted or hdrs.X_FORWARDED_PROTO not in headers:
            headers[hdrs.X_FORWARDED_PROTO] = request.scheme
        return headers, host, coding

    def client_of(self, request: web.BaseRequest) -> str | None:
        """The client's address: the peer, or behind trusted proxies the last address of
        X-Forwarded-For that is not one of them."""
        peer = request.remote
        if not self._is_trusted(peer):
            return peer
        hops = [
            hop.strip()
            for value in request.headers.getall(hdrs.X_FORWARDED_FOR, ())
            for hop in value.split(",")
            if hop.strip()
        ]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else peer

    def _is_trusted(self, peer: str | None) -> bool:
        if not self._trusted or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)
