"""How the admit step (admission.py) is set up from the settings, for one upstream or a fleet.

- Gated upstreams: those whose ``slots`` is set explicitly (``[[upstream]] slots``, or
  ``--slots`` with one upstream, named ``default``). None: no admission step at all.
- The queue's bounds come from ``[limits]`` (its defaults without the table).
- What a request occupies: with one upstream, (``default``, its model); in a fleet, (the
  upstream the router chose, the model as the fleet tracks it there). A request that runs no
  model there (a show, a model nobody lists) occupies nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from ..limit_settings import LimitSettings
from ..settings import Settings
from .dispatch import Dispatch, Target

SINGLE: Final = "default"


def gated_slots(settings: Settings) -> dict[str, int]:
    if settings.upstreams:
        return {u.name: u.slots for u in settings.upstreams if u.slots is not None}
    return {} if settings.slots is None else {SINGLE: settings.slots}


def queue_bounds(limits: LimitSettings) -> tuple[int, float, int]:
    return limits.max_queue, limits.max_queue_wait, limits.max_queued_per_key


def where_of(dispatch: Dispatch | None) -> Callable[[Any], tuple[str, str] | None]:
    if dispatch is None:
        return _single
    return _fleet


def _single(model: str | None) -> tuple[str, str] | None:
    return None if model is None else (SINGLE, model)


def _fleet(target: Target) -> tuple[str, str] | None:
    return None if target.key is None else (target.node.name, target.key)
