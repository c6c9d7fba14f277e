"""The Recipe round-trips exactly through JSON and YAML and hashes stably."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from evomerge.recipe import Recipe

floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
values = st.one_of(
    floats,
    st.lists(floats, min_size=1, max_size=6).map(tuple),
    st.fixed_dictionaries({"self_attn": floats, "mlp": floats, "default": floats}),
)


@given(w=values, d=values, seed=st.integers(0, 2**31), t=floats)
def test_round_trip_exact(w, d, seed, t):
    r = Recipe(
        method="ties",
        sources={"base": "b", "x": "x/y"},
        base_model="base",
        models={"x": {"weight": w, "density": d}},
        parameters={"normalize": True, "lambda": t},
        seed=seed,
    )
    assert Recipe.from_json(r.to_json()) == r
    assert Recipe.from_yaml(r.to_yaml()) == r
    assert Recipe.from_json(r.to_json()).hash == r.hash


def test_hash_changes_with_content():
    a = Recipe(method="linear", sources={"x": "x", "y": "y"}, models={"x": {"weight": 0.5}})
    b = Recipe(method="linear", sources={"x": "x", "y": "y"}, models={"x": {"weight": 0.6}})
    assert a.hash != b.hash and len(a.hash) == 16


def test_dfs_path_round_trip():
    r = Recipe(
        method="linear",
        sources={"a": "a", "b": "b"},
        dfs={"layers": [["a", 0], ["b", 1]], "scales": [1.0, 0.5], "embed_from": "a"},
    )
    assert Recipe.from_yaml(r.to_yaml()) == r


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"base_model": "zz"}, "base_model 'zz' is not in sources"),
        ({"models": {"q": {"weight": 1.0}}}, "models.q is not in sources"),
        ({"models": {"x": {"weight": {"attn": 1.0}}}}, "unknown module kind"),
        ({"extra": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_recipes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**{"method": "linear", "sources": {"x": "x"}, **kwargs})


def test_recipe_is_frozen():
    r = Recipe(method="linear", sources={"x": "x"})
    with pytest.raises(ValidationError):
        r.method = "ties"
