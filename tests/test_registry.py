from __future__ import annotations

import pytest

from evomerge.registries import EVALUATORS, MERGE_METHODS, SAMPLERS, SEARCH_SPACES
from evomerge.registry import Registry, UnknownNameError


def test_duplicate_name_is_an_error():
    r = Registry("thing")
    r.register("a", "x:y")
    with pytest.raises(ValueError, match="already registered"):
        r.register("a", "x:z")


def test_unknown_name_suggests_closest():
    with pytest.raises(UnknownNameError, match="Did you mean 'task_arithmetic'"):
        MERGE_METHODS.check("task_arithmatic")


@pytest.mark.parametrize("registry", [MERGE_METHODS, SEARCH_SPACES, EVALUATORS, SAMPLERS])
def test_every_registered_target_imports(registry):
    for name in registry.names():
        assert registry.get(name) is not None
