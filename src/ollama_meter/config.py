"""The validated, immutable settings of one ollama-meter process.

Owns the parsing of addresses: the upstream is written the way ``OLLAMA_HOST`` is (``host``,
``host:port``, ``:port``, a URL; no scheme means http and port 11434; an explicit http or https
without a port means 80 or 443), and listen addresses as ``host:port``. Every problem is a
``ConfigError`` whose message can be shown to a user as is.

Must not know about click or the environment: cli.py reads those and calls ``Config.build``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final, Literal

from yarl import URL

DEFAULT_UPSTREAM_PORT: Final = 11434
DEFAULT_LISTEN_PORT: Final = 11435
_SCHEME_PORTS: Final = {"http": 80, "https": 443}
_UNSPECIFIED: Final = frozenset({"", "0.0.0.0", "::"})

_DEFAULT_UPSTREAM: Final = URL("http://127.0.0.1:11434")

LogFormat = Literal["text", "json"]
#: When the Host rule applies: auto (on a loopback listener, as in Ollama), on, off.
HostCheckMode = Literal["auto", "on", "off"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in _UNSPECIFIED else self.host
        return f"http://{HostPort(host, self.port)}"


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ConfigError(f"{what}: port {text!r} is not a number from 0 to 65535")
    return int(text)


def _split_authority(text: str, what: str) -> tuple[str, int | None]:
    """``host:port``, ``[v6]:port``, ``[v6]``, a bare IPv6 address, ``:port`` or ``host``."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"{what}: {text!r} is not [IPv6]:port")
        return host, _port(rest[1:], what) if rest else None
    if text.count(":") > 1:  # a bare IPv6 address, no port
        return text, None
    host, sep, port = text.partition(":")
    return host, _port(port, what) if sep else None


def parse_listen(text: str, what: str = "listen address") -> HostPort:
    """``host:port``, ``[v6]:port``, ``:port`` (all interfaces) or a bare host (port 11435)."""
    text = text.strip()
    if not text:
        raise ConfigError(f"{what}: empty")
    host, port = _split_authority(text, what)
    return HostPort(host or "0.0.0.0", DEFAULT_LISTEN_PORT if port is None else port)


def parse_upstream(text: str) -> URL:
    """An Ollama address as ``OLLAMA_HOST`` accepts it, as a URL with scheme, host and port."""
    raw = text.strip().strip("\"'").strip()
    if not raw:
        raise ConfigError("upstream: empty")
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "http", raw
    scheme = scheme.lower()
    if scheme not in _SCHEME_PORTS:
        raise ConfigError(f"upstream: scheme {scheme!r} is not http or https")
    authority, _, path = rest.partition("/")
    if "@" in authority:
        raise ConfigError("upstream: credentials in the address are not supported")
    host, port = _split_authority(authority, "upstream")
    if port is None:
        port = _SCHEME_PORTS[scheme] if sep else DEFAULT_UPSTREAM_PORT
    if port == 0:
        raise ConfigError("upstream: port 0 cannot be connected to")
    # ":11434" means this machine, as it does for Ollama's own clients.
    host = host or "127.0.0.1"
    path = path.rstrip("/")
    try:
        return URL.build(scheme=scheme, host=host, port=port, path=f"/{path}" if path else "")
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"upstream: {text!r} is not a valid address ({exc})") from None


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


_HOST_NAME: Final = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


def parse_allowed_hosts(text: str) -> tuple[str, ...]:
    """``meter.example.com,.example.org``: host names (a leading dot: every name under it)."""
    hosts = []
    for item in _items(text.lower()):
        if not _HOST_NAME.fullmatch(item.removeprefix(".")):
            raise ConfigError(f"allowed-hosts: {item!r} is not a host name")
        hosts.append(item)
    return tuple(hosts)


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """``10.0.0.0/8,127.0.0.1``: addresses or CIDR networks."""
    networks = []
    for item in _items(text):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(
                f"trusted-proxies: {item!r} is not an IP address or network"
            ) from None
    return tuple(networks)


def is_loopback_listener(listen: HostPort) -> bool:
    """Does this listener take connections only from this machine?"""
    return _is_loopback(listen.host)


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _same_endpoint(listen: HostPort, host: str, port: int) -> bool:
    """Would connecting to host:port reach a socket listening on ``listen``?"""
    if listen.port != port:
        return False
    if listen.host == host:
        return True
    if listen.host in _UNSPECIFIED:
        return _is_loopback(host) or host in _UNSPECIFIED
    return _is_loopback(listen.host) and _is_loopback(host)


@dataclass(frozen=True, slots=True)
class Config:
    """Settings; build with ``Config.build`` to validate them."""

    listen: HostPort = HostPort("127.0.0.1", DEFAULT_LISTEN_PORT)
    upstream: URL = _DEFAULT_UPSTREAM
    metrics_listen: HostPort | None = None
    preserve_host: bool = False
    max_inspect_bytes: int = 64 * 1024 * 1024
    #: All request bodies being read to inspect them at once, together; past it, bodies stream
    #: through unlabelled.
    max_inspect_total: int = 256 * 1024 * 1024
    #: How much of a stream's end is kept to read its usage (the final line or events).
    max_response_tail: int = 1024 * 1024
    max_models: int = 100
    host_check: HostCheckMode = "auto"
    #: Host names accepted beyond Ollama's own rule where it applies (lowercase).
    allowed_hosts: tuple[str, ...] = ()
    #: Peers whose X-Forwarded-Proto/-Host/-Port are believed.
    trusted_proxies: tuple[IPNetwork, ...] = ()
    #: Add include_usage to /v1/chat/completions streams and hide the usage event it adds.
    openai_stream_usage: bool = False
    connect_timeout: float = 10.0
    #: Longest silence from the upstream, headers included; None: wait forever.
    read_timeout: float | None = 600.0
    probe_timeout: float = 2.0
    shutdown_timeout: float = 30.0
    #: Idle keep-alive connections, and request heads still incomplete, are closed after this.
    keepalive_timeout: float = 10.0
    log_format: LogFormat = "text"
    access_log: bool = True
    #: Serve /-/status and /-/status.json (the built-in status page).
    status_page: bool = True

    @classmethod
    def build(
        cls,
        *,
        listen: str,
        upstream: str,
        metrics_listen: str | None = None,
        preserve_host: bool = False,
        max_inspect_bytes: int = 64 * 1024 * 1024,
        max_inspect_total: int = 256 * 1024 * 1024,
        max_response_tail: int = 1024 * 1024,
        max_models: int = 100,
        host_check: HostCheckMode = "auto",
        allowed_hosts: str = "",
        trusted_proxies: str = "",
        openai_stream_usage: bool = False,
        connect_timeout: float = 10.0,
        read_timeout: float = 600.0,
        probe_timeout: float = 2.0,
        shutdown_timeout: float = 30.0,
        keepalive_timeout: float = 10.0,
        log_format: LogFormat = "text",
        access_log: bool = True,
        status_page: bool = True,
    ) -> Config:
        """Parse and check every setting. ``read_timeout=0`` means no read timeout."""
        for name, value in (
            ("connect-timeout", connect_timeout),
            ("probe-timeout", probe_timeout),
            ("keepalive-timeout", keepalive_timeout),
        ):
            if not value > 0:
                raise ConfigError(f"{name}: must be more than 0 seconds, got {value}")
        if read_timeout < 0:
            raise ConfigError(f"read-timeout: must be 0 (none) or more, got {read_timeout}")
        if shutdown_timeout < 0:
            raise ConfigError(f"shutdown-timeout: must be 0 or more, got {shutdown_timeout}")
        if max_inspect_bytes < 0:
            raise ConfigError(f"max-inspect-bytes: must be 0 or more, got {max_inspect_bytes}")
        for name, size in (
            ("max-inspect-total", max_inspect_total),
            ("max-response-tail", max_response_tail),
            ("max-models", max_models),
        ):
            if size < 0:
                raise ConfigError(f"{name}: must be 0 or more, got {size}")
        config = cls(
            listen=parse_listen(listen),
            upstream=parse_upstream(upstream),
            metrics_listen=parse_listen(metrics_listen, "metrics listen address")
            if metrics_listen
            else None,
            preserve_host=preserve_host,
            max_inspect_bytes=max_inspect_bytes,
            max_inspect_total=max_inspect_total,
            max_response_tail=max_response_tail,
            max_models=max_models,
            host_check=host_check,
            allowed_hosts=parse_allowed_hosts(allowed_hosts),
            trusted_proxies=parse_networks(trusted_proxies),
            openai_stream_usage=openai_stream_usage,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout or None,
            probe_timeout=probe_timeout,
            shutdown_timeout=shutdown_timeout,
            keepalive_timeout=keepalive_timeout,
            log_format=log_format,
            access_log=access_log,
            status_page=status_page,
        )
        config._check_loops()
        return config

    def checks_host(self, listen: HostPort) -> bool:
        """Does the Host rule apply on this listener (``auto``: on loopback, as in Ollama)?"""
        if self.host_check == "auto":
            return is_loopback_listener(listen)
        return self.host_check == "on"

    def check_upstream(self, upstream: URL) -> None:
        """Refuse an upstream that is one of this proxy's own listeners (requests would loop)."""
        host, port = upstream.host or "", upstream.port or 0
        for what, listen in (("listen", self.listen), ("metrics listen", self.metrics_listen)):
            if listen is not None and listen.port and _same_endpoint(listen, host, port):
                raise ConfigError(
                    f"upstream {upstream} is this proxy's own {what} address {listen}: "
                    "requests would loop"
                )

    def _check_loops(self) -> None:
        host, port = self.upstream.host or "", self.upstream.port or 0
        for what, listen in (("listen", self.listen), ("metrics listen", self.metrics_listen)):
            if listen is not None and listen.port and _same_endpoint(listen, host, port):
                raise ConfigError(
                    f"upstream {self.upstream} is this proxy's own {what} address {listen}: "
                    "requests would loop"
                )
        if (
            self.metrics_listen is not None
            and self.metrics_listen.port
            and self.metrics_listen.port == self.listen.port
            and (
                self.metrics_listen.host == self.listen.host
                or {self.metrics_listen.host, self.listen.host} & _UNSPECIFIED
            )
        ):
            raise ConfigError(
                f"metrics listen address {self.metrics_listen} is the proxy's listen address"
            )
