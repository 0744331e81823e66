"""Which ``Host`` a loopback listener answers: Ollama's own defence against DNS rebinding.

A web page on evil.example can make a browser resolve evil.example to 127.0.0.1 and then talk
to anything listening on loopback, with ``Host: evil.example``. Ollama refuses that on a
loopback listener (its ``allowedHostsMiddleware``); the proxy sets ``Host`` to the upstream's
own authority, so that check can never fire behind it, and the proxy applies the same rule on
its own listener instead:

- on a listener that is not on loopback every host is accepted (as in Ollama: that listener is
  meant to be reached by name from elsewhere);
- on a loopback listener a host is accepted when it is empty, ``localhost``, this machine's
  hostname, a name under ``.localhost``, ``.local`` or ``.internal``, a loopback, private or
  unspecified IP address, or one of the operator's extra names (``--allowed-hosts``; a
  leading dot allows every name under it). Anything else is answered 403 with an empty body,
  as Ollama answers it.

Ollama also accepts the address of any local network interface; the standard library cannot
list those, so such an address needs ``--allowed-hosts`` (a private one is accepted anyway).

``--host-check on`` applies the rule on any listener (a container listening on 0.0.0.0 and
published on the host's loopback, as in compose.yaml), ``off`` nowhere.

Pure but for ``host_check_for``, which reads this machine's hostname.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Final

from .config import Config, HostPort

_LOCAL_SUFFIXES: Final = (".localhost", ".local", ".internal")
# Go's netip IsPrivate (RFC 1918, RFC 4193); Python's is_private also takes in documentation and
# other reserved ranges, which Ollama does not.
_PRIVATE: Final = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


# A Host value as RFC 9110 has it: a registered name or an address, then an optional port.
# Anything else (userinfo, fragments, text after the brackets) is refused, never guessed at.
_AUTHORITY: Final = re.compile(r"(?:\[([0-9a-f:.]+)\]|([a-z0-9._~!$&'()*+,;=%-]*))(?::[0-9]*)?")


def host_name(host: str) -> str | None:
    """The name or address of a ``Host`` value, lowercase, without port or brackets; None if
    it is not a well-formed authority."""
    match = _AUTHORITY.fullmatch(host.strip().lower())
    if match is None:
        return None
    return match[1] if match[1] is not None else match[2]


# Host values repeat (every client sends the same one or two): answers are kept, boundedly.
_CACHE_LIMIT: Final = 256
_CACHE_KEY_LIMIT: Final = 256


class HostCheck:
    """Ollama's Host rule for a loopback listener, plus the operator's extra names."""

    __slots__ = ("_cache", "_exact", "_hostname", "_suffixes")

    def __init__(self, hostname: str, extra: tuple[str, ...] = ()) -> None:
        self._hostname = hostname.lower()
        self._exact = frozenset(name for name in extra if not name.startswith("."))
        self._suffixes = (*_LOCAL_SUFFIXES, *(name for name in extra if name.startswith(".")))
        self._cache: dict[str, bool] = {}

    def allows(self, host: str) -> bool:
        known = self._cache.get(host)
        if known is not None:
            return known
        allowed = self._judge(host)
        if len(host) <= _CACHE_KEY_LIMIT:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[host] = allowed
        return allowed

    def _judge(self, host: str) -> bool:
        name = host_name(host)
        if name is None:
            return False
        if not name or name == "localhost" or name == self._hostname or name in self._exact:
            return True
        if name.endswith(self._suffixes):
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        if address.is_loopback or address.is_unspecified:
            return True
        return any(address in network for network in _PRIVATE)


def host_check_for(config: Config, listen: HostPort) -> HostCheck | None:
    """The Host rule for a listener of this config, or None where it does not apply."""
    if not config.checks_host(listen):
        return None
    return HostCheck(socket.gethostname(), config.allowed_hosts)
