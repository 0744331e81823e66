"""What Dispatch.place_now takes for granted of the two route tables: an inference route is
never model management (nor the blobs route), so its route class need not be asked."""

from __future__ import annotations

import pytest

from ollama_meter.gateway.dispatch import _BLOBS
from ollama_meter.gateway.policy import RouteClass, route_class
from ollama_meter.ollama import ENDPOINTS, route_for

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@pytest.mark.parametrize("template", ENDPOINTS)
def test_an_inference_route_is_never_model_management(template: str) -> None:
    route = route_for(
        template.replace("{digest}", "sha256:0").replace("{model}", "m").replace("{key}", "k")
    )
    if not route.inference:
        return
    assert route.template != _BLOBS
    for method in _METHODS:
        assert route_class(method, route.template) is not RouteClass.MODEL_ADMIN
