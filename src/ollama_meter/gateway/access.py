"""Access control, as proxy.py calls it: who a request is and whether it may go on, and,
once it has ended, what it is recorded as (per-key usage, the audit log).

Rules:
1. ``identify`` (authenticate, then authorize the route class) runs before the request body
   is read; ``check_body`` (the key's model allow-list, the keep_alive clamp) right after it
   is. Both refuse with a ``Refusal`` that carries the status, the route's message and, for
   401, ``WWW-Authenticate``; nothing has gone upstream then.
2. A public route is open to anyone: a key sent there only attributes the request.
3. On a role listener (``[[access.listener]]``) every request has at least that role; a
   working key still names it.
4. A key's ``models`` list can only be checked on a body that was read: an encoded body,
   one over --max-inspect-bytes, or a route whose body is not JSON (audio) is refused for
   such a key rather than let through unchecked.
5. ``max_keep_alive`` rewrites the ``keep_alive`` of native inference bodies of non-admin
   keys, and nothing else (keep_alive.py); such a body that could not be read is refused
   too, for the same reason.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from multidict import CIMultiDictProxy

from ..exchange import Exchange
from ..inbound import Refusal
from ..ollama import Route
from .audit import AuditLog, audit_line, request_names
from .identity import ANONYMOUS, MISSING, Identity, KeyRing, credential
from .keep_alive import clamp_keep_alive
from .keys import ROLES, Role
from .policy import (
    AMBIGUOUS,
    RouteClass,
    allows,
    is_preflight,
    model_allowed,
    model_ollama_runs,
    route_class,
)
from .usage import KeyUsage

_CHALLENGE: Final = {"WWW-Authenticate": 'Bearer realm="ollama-meter"'}
_MESSAGES: Final = {
    "missing": "ollama-meter: an API key is required: send Authorization: Bearer om_...",
    "invalid": "ollama-meter: the API key is not valid",
    "disabled": "ollama-meter: the API key {name!r} is disabled",
    "expired": "ollama-meter: the API key {name!r} has expired",
}
#: Native inference routes whose body may carry keep_alive.
_KEEP_ALIVE_ROUTES: Final = frozenset(
    {"/api/generate", "/api/chat", "/api/embed", "/api/embeddings"}
)
_SHOWN_NAME: Final = 100
#: Bodies up to this size have their keep_alive bounded on the event loop.
_INLINE: Final = 64 * 1024
_UPSTREAM: Final = "default"


@dataclass(slots=True)
class Gate:
    """What access control learnt of one request, for its record step."""

    identity: Identity
    cls: RouteClass
    refusal: Refusal | None = None
    #: The JSON body of a call that is audited, to take its names from.
    body: bytes | None = None

    @property
    def refused(self) -> str | None:
        return None if self.refusal is None else self.refusal.reason


def _higher(a: Role, b: Role | None) -> Role:
    return a if b is None or ROLES.index(a) >= ROLES.index(b) else b


class Access:
    def __init__(
        self,
        ring: KeyRing,
        usage: KeyUsage,
        *,
        anonymous: Role | None,
        max_keep_alive: float | None,
        audit: AuditLog | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ring = ring
        self.usage = usage
        self._anonymous = Identity(ANONYMOUS, None, anonymous)
        self._max_keep_alive = max_keep_alive
        self.audit = audit
        self._clock = clock

    def identify(
        self,
        headers: CIMultiDictProxy[str],
        method: str,
        route: Route,
        listener_role: Role | None = None,
    ) -> Gate:
        """Authenticate, and authorize the route class (rule 1): the gate, with its
        ``refusal`` set when the request may not go on."""
        cls = route_class(method, route.template, is_preflight(method, headers.__contains__))
        key = credential(headers)
        found = self.ring.authenticate(key, self._clock())
        if isinstance(found, str):
            identity = self._anonymous
            if listener_role is not None:
                identity = identity.with_role(_higher(listener_role, identity.role))
            elif cls is not RouteClass.PUBLIC and (found != MISSING or identity.role is None):
                named = None if key is None else self.ring.matching(key)
                message = _MESSAGES[found].format(name=named.name if named else "")
                gate = Gate(identity, cls)
                _refuse(gate, 401, found, message)
                return gate
        else:
            identity = found
            if listener_role is not None:
                identity = identity.with_role(_higher(listener_role, identity.role))
        gate = Gate(identity, cls)
        if not allows(identity.role, cls):
            who = f"key {identity.name!r}" if identity.keyed else "clients without a key"
            _refuse(
                gate,
                403,
                "forbidden_route",
                f"ollama-meter: {who} (role {identity.role or 'none'}) may not use "
                f"{method} {route.template}",
            )
        return gate

    def check_scraper(
        self, headers: CIMultiDictProxy[str], role: Role | None = None, what: str = "/metrics"
    ) -> Refusal | None:
        """``/metrics`` on the proxy's own listener: it names every key and its usage, so it
        needs a working key (any role, or ``role``), never anonymous."""
        found = self.ring.authenticate(credential(headers), self._clock())
        if not isinstance(found, str):
            if role is None or found.role == role:
                return None
            gate = Gate(found, RouteClass.OTHER)
            self.usage.refused("forbidden_route")
            return _refuse(
                gate, 403, "forbidden_route", f"ollama-meter: {what} needs an {role} key"
            )
        self.usage.refused(found)
        message = _MESSAGES[found].format(name="")
        if found == MISSING:
            message = f"ollama-meter: {what} needs an API key"
            if what == "/metrics":
                message += " (or use --metrics-listen)"
        return _refuse(Gate(self._anonymous, RouteClass.OTHER), 401, found, message)

    async def check_body(
        self, gate: Gate, route: Route, model: str | None, body: bytes | None, read: bool
    ) -> bytes | None:
        """Check the key's model allow-list (rule 4) and clamp keep_alive (rule 5): the body
        to send instead, if it had to change, or a Refusal raised. ``read``: the body was
        read whole (or there was none)."""
        if self.audits(gate):
            gate.body = body
        identity = gate.identity
        if gate.cls is not RouteClass.INFERENCE:
            return None
        if identity.models is not None:
            model = model_ollama_runs(body)
        if identity.models is not None and not model_allowed(identity.models, model):
            gate.body = body
            if model == AMBIGUOUS:
                raise _refuse(
                    gate,
                    400,
                    "forbidden_model",
                    "ollama-meter: the request body names its model under more than one "
                    "spelling of 'model'",
                )
            if not read:
                message = (
                    f"ollama-meter: key {identity.name!r} may use only some models, and the "
                    "model of this request cannot be read (an encoded body, one over "
                    "--max-inspect-bytes, or a route whose body is not JSON)"
                )
            else:
                shown = (model or "")[:_SHOWN_NAME]
                message = f"ollama-meter: key {identity.name!r} may not use model {shown!r}"
            raise _refuse(gate, 403, "forbidden_model", message)
        limit = self._max_keep_alive
        if limit is None or identity.role == "admin" or route.template not in _KEEP_ALIVE_ROUTES:
            return None
        if not read:
            raise _refuse(
                gate,
                403,
                "forbidden_model",
                "ollama-meter: keep_alive is limited for this key, and this request's body "
                "cannot be read to check it (an encoded body, or one over --max-inspect-bytes)",
            )
        if body is None:
            return None
        if len(body) <= _INLINE:
            return clamp_keep_alive(body, limit)
        # About 1 us per top-level member: a large body is walked off the event loop.
        return await asyncio.to_thread(clamp_keep_alive, body, limit)

    # --- the record step ---------------------------------------------------------------

    def audits(self, gate: Gate) -> bool:
        return self.audit is not None and (
            gate.refusal is not None or gate.cls is RouteClass.MODEL_ADMIN
        )

    def finished(
        self, x: Exchange, gate: Gate | None, client: Callable[[], str | None], path: str
    ) -> None:
        """Per-key usage, and the audit line of a model-management or refused call."""
        self.usage.finished(x)
        if gate is None:
            return
        reason = gate.refused
        if reason is not None:
            self.usage.refused(reason)
        if self.audit is None or not self.audits(gate):
            return
        self.audit.write(
            audit_line(
                at=self._clock() - x.duration,
                request_id=secrets.token_hex(8),
                key=gate.identity.name,
                team=gate.identity.team,
                client=client(),
                method=x.method,
                route=x.endpoint,
                upstream=_UPSTREAM if x.target is None else x.target.node.name,
                names=request_names(x.endpoint, gate.body, path, x.request_bytes),
                status=x.status,
                duration=x.duration,
                outcome=_outcome(x, gate),
                reason=reason,
            )
        )


def _refuse(gate: Gate, status: int, reason: str, message: str) -> Refusal:
    gate.refusal = Refusal(status, message, _CHALLENGE if status == 401 else None, reason)
    return gate.refusal


def _outcome(x: Exchange, gate: Gate) -> str:
    if gate.refusal is not None:
        return "denied"
    if x.status >= 400 or x.error == "stream_error":
        return "error"
    if x.error is None and 200 <= x.status < 300:
        return "success"
    return "incomplete"
