"""The effective settings as the status page shows them: flat ``name: value`` pairs.

Rule: nothing secret leaves here. Upstream ``headers`` (tokens), the keys file's contents,
passwords, and the user part of every URL (``user:password@``) are left out; a Redis or
PostgreSQL URL keeps only what ``ledger_settings.printable`` keeps (no password).
"""

from __future__ import annotations

import dataclasses
from typing import Final

from yarl import URL

from ..config import Config, HostPort
from ..ledger_settings import printable
from ..settings import Settings

#: Config fields left out: none is secret, but these say nothing an operator looks for here.
_SKIP: Final = frozenset({"log_format", "access_log", "status_page"})


def _text(value: object) -> object:
    if isinstance(value, HostPort):
        return f"{value.host}:{value.port}"
    if isinstance(value, URL):
        return str(value.with_user(None))
    if isinstance(value, tuple):
        return ", ".join(str(_text(v)) for v in value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def config_view(config: Config, settings: Settings) -> dict[str, object]:
    view: dict[str, object] = {}
    for field in dataclasses.fields(config):
        if field.name not in _SKIP:
            view[field.name] = _text(getattr(config, field.name))
    if settings.source is not None:
        view["config_file"] = settings.source
    if settings.upstreams:
        del view["upstream"]
        for up in settings.upstreams:
            view[f"upstream.{up.name}"] = str(up.url.with_user(None))
            view[f"upstream.{up.name}.slots"] = up.slots
            view[f"upstream.{up.name}.max_loaded"] = up.max_loaded or None
        view["routing.admin_upstream"] = settings.routing.admin_upstream
    elif settings.slots is not None:
        view["slots"] = settings.slots
    access = settings.access
    view["access_control"] = access is not None
    if access is not None:
        view["access.keys_file"] = str(access.keys_file)
        view["access.anonymous"] = access.anonymous
        view["access.audit_log"] = access.audit_log
        view["access.max_key_labels"] = access.max_key_labels
        for listener in access.listeners:
            where = f"{listener.listen.host}:{listener.listen.port}"
            view[f"access.listener.{where}"] = listener.role
    limits = settings.limits
    if limits is not None:
        view["limits.default_rpm"] = limits.defaults.rpm
        view["limits.default_tpm"] = limits.defaults.tpm
        view["limits.default_concurrency"] = limits.defaults.concurrency
        view["limits.max_queue"] = limits.max_queue
        view["limits.max_queue_wait"] = limits.max_queue_wait
        view["limits.max_queued_per_key"] = limits.max_queued_per_key
        view["limits.redis"] = None if limits.redis is None else printable(limits.redis)
        view["limits.replicas"] = limits.replicas
    ledger = settings.ledger
    if ledger is not None:
        view["ledger"] = ledger.where
        view["ledger.flush_interval"] = ledger.flush_interval
    return view
