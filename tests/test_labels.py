"""Model labels, pure: bounded names, the upstream's spelling, the cap, the raw-spelling cache."""

from __future__ import annotations

import pytest

from ollama_meter.labels import MAX_NAME_LENGTH, OTHER, UNKNOWN, ModelLabels


def test_known_names_are_spelt_as_the_upstream_spells_them() -> None:
    labels = ModelLabels(max_models=0)
    labels.set_known(["Llama3.2:latest", "qwen3:8b"])
    assert labels.label("llama3.2") == "Llama3.2:latest"
    assert labels.label(" LLAMA3.2:latest ") == "Llama3.2:latest"
    assert labels.label("registry.ollama.ai/library/qwen3:8b") == "qwen3:8b"
    assert labels.label("mistral") == OTHER  # not known, and no room for others
    assert labels.label(None) == UNKNOWN


def test_other_names_are_allowed_up_to_the_cap() -> None:
    labels = ModelLabels(max_models=2)
    assert [labels.label(n) for n in ("a", "b", "c", "A")] == [
        "a:latest",
        "b:latest",
        OTHER,
        "a:latest",
    ]


@pytest.mark.parametrize(
    "name",
    [
        "m" * (MAX_NAME_LENGTH + 1),
        "llama3.2" + " " * (5 * 1024 * 1024),
        "bad\nname",
        'quote"name',
        "name{label}",
        "café",
    ],
)
def test_names_ollama_would_never_accept_are_other(name: str) -> None:
    labels = ModelLabels(max_models=100)
    labels.set_known(["llama3.2:latest"])
    assert labels.label(name) == OTHER
    # ...and do not use up the room for other names.
    for i in range(100):
        assert labels.label(f"m{i}") == f"m{i}:latest"


def test_a_name_of_the_longest_accepted_length_is_labelled() -> None:
    name = "m" * MAX_NAME_LENGTH
    assert ModelLabels(max_models=1).label(name) == name + ":latest"


def test_new_tags_change_what_a_cached_spelling_means() -> None:
    labels = ModelLabels(max_models=0)
    labels.set_known(["llama3.2:latest"])
    assert labels.label("LLAMA3.2") == "llama3.2:latest"
    labels.set_known(["LLaMA3.2:latest"])  # re-created with another spelling
    assert labels.label("LLAMA3.2") == "LLaMA3.2:latest"
    labels.set_known([])
    assert labels.label("LLAMA3.2") == OTHER
