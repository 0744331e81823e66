"""The record of one proxied request: what the proxy saw, read by metrics and the access log.

proxy.py fills it while bytes flow; metrics.py and logs.py only read it. It holds no bytes of
the request or response, only sizes, times, labels and what the upstream reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .ollama import Usage

if TYPE_CHECKING:
    from .gateway.access import Gate
    from .gateway.admission import Slot
    from .gateway.dispatch import Target
    from .gateway.limits import Held

# Values of the ``reason`` label of request_errors_total (a fixed enum).
UPSTREAM_UNREACHABLE: Final = "upstream_unreachable"
UPSTREAM_TIMEOUT: Final = "upstream_timeout"
UPSTREAM_CLOSED: Final = "upstream_closed"
STREAM_ERROR: Final = "stream_error"
CLIENT_DISCONNECT: Final = "client_disconnect"
SHUTDOWN: Final = "shutdown"
ERROR_REASONS: Final = (
    UPSTREAM_UNREACHABLE,
    UPSTREAM_TIMEOUT,
    UPSTREAM_CLOSED,
    STREAM_ERROR,
    CLIENT_DISCONNECT,
    SHUTDOWN,
)

#: Status label of a request whose client went away before the response ended (nginx's code).
STATUS_CLIENT_CLOSED: Final = 499
#: Status label of a request cut at shutdown before any response was sent.
STATUS_SHUTDOWN: Final = 503


@dataclass(slots=True)
class Exchange:
    method: str
    endpoint: str
    started: float  # loop.time() at arrival
    model: str = "unknown"
    stream: bool = False
    inference: bool = False  # the route runs a model on a prompt (ollama.Route.inference)
    status: int = 0  # what the client received (or 499/503 as above)
    first_byte: float | None = None  # loop.time() of the first response body chunk
    finished: float | None = None
    streamed: bool = False  # the response was NDJSON or SSE
    request_bytes: int = 0
    response_bytes: int = 0
    usage: Usage | None = None
    usage_oversized: bool = False  # the final record was too long to read its usage
    records: int = 0  # NDJSON lines or SSE data lines of a streamed body
    error: str | None = None  # one of ERROR_REASONS
    #: Answered by the proxy itself (inbound.Refusal): its reason word, or "refused".
    refused: str | None = None
    in_flight: bool = False  # counted in requests_in_flight (the model label was known)
    recorded: bool = False  # metrics taken (exactly once)
    #: With access control on: the key's name (None: anonymous), its team, and what access
    #: control learnt of the request (a gateway.access.Gate), for the record step.
    key: str | None = None
    team: str | None = None
    gate: Gate | None = None
    #: In a fleet: where it went (a gateway.dispatch.Target), and whether its model was cold
    #: there when it was sent.
    target: Target | None = None
    #: Whether it was sent to ``target`` (a request refused or left in the admit step, after
    #: the route step named it, never was: it did not end there either).
    dispatched: bool = False
    cold: bool = False
    loading: bool = False  # cold, and its response head has not come yet
    #: With [limits]: the key's place in the limits (a gateway.limits.Held), until recorded.
    held: Held | None = None
    #: Its slot at (upstream, model) when the upstream is gated (a gateway.admission.Slot).
    slot: Slot | None = None

    @property
    def duration(self) -> float:
        return (self.finished or self.started) - self.started

    @property
    def time_to_first_byte(self) -> float | None:
        return None if self.first_byte is None else self.first_byte - self.started
