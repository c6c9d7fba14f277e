"""Recipes of both kinds round-trip exactly through JSON and YAML and hash stably; recipes stored
before kinds existed load unchanged as ps recipes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from evomerge.recipe import DFSRecipe, Recipe

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


# What HEAD's (pre-kind) Recipe.to_dict() wrote, copied verbatim: no 'kind' key.
STORED_PS = {
    "method": "ties", "sources": {"base": "models/base", "a": "org/a@v1", "b": "models/b"},
    "base_model": "base",
    "models": {"a": {"weight": {"self_attn": [0.1, 0.2], "mlp": 0.7, "default": 0.5},
                     "density": 0.4},
               "b": {"weight": [0.3, 0.6], "density": 0.5}},
    "parameters": {"normalize": True, "lambda": 1.0}, "non_layer": "base", "dtype": "bfloat16",
    "seed": 3,
}
STORED_PS_HASH = "9cc7d0a67f84021d"
STORED_LEGACY_DFS = {
    "method": "linear", "sources": {"a": "a", "b": "b"}, "models": {}, "parameters": {},
    "non_layer": "first", "seed": 0,
    "dfs": {"layers": [["a", 0], ["b", 1]], "scales": [1.0, 0.5], "embed_from": "a"},
}
STORED_LEGACY_DFS_HASH = "5e993d0dc7ed5465"


@pytest.mark.parametrize("stored, digest", [(STORED_PS, STORED_PS_HASH),
                                            (STORED_LEGACY_DFS, STORED_LEGACY_DFS_HASH)])
def test_stored_recipes_load_as_ps_unchanged(stored, digest):
    r = Recipe.from_dict(stored)
    assert type(r) is Recipe and r.kind == "ps"
    assert r.to_dict() == stored and r.hash == digest  # same bytes: same YAML, same hash
    assert "kind" not in r.to_yaml()
    assert Recipe.from_dict({**stored, "kind": "ps"}) == r


names = st.sampled_from(["a", "b", "c"])
ps_recipes = st.builds(
    lambda w, seed: Recipe(method="linear", sources={"a": "m/a", "b": "org/b@rev"},
                           models={"a": {"weight": w}, "b": {"weight": 1.0}}, seed=seed),
    values, st.integers(0, 2**31),
)


@st.composite
def dfs_recipes(draw):
    sources: dict = {"a": "m/a", "b": "org/b", "c": draw(ps_recipes)}  # c: PS-then-DFS
    layers = draw(st.lists(st.tuples(names, st.integers(0, 64)), min_size=1, max_size=12))
    scales = draw(st.lists(floats, min_size=len(layers), max_size=len(layers)))
    dtype = draw(st.sampled_from([None, "float32", "bfloat16"]))
    return DFSRecipe(sources=sources, layers=layers, scales=scales, embed_from=draw(names),
                     dtype=dtype)


@given(r=st.one_of(ps_recipes, dfs_recipes()))
def test_round_trip_exact_over_both_kinds(r):
    for back in (Recipe.from_json(r.to_json()), Recipe.from_yaml(r.to_yaml()),
                 DFSRecipe.from_dict(r.to_dict())):
        assert type(back) is type(r) and back == r and back.hash == r.hash
    assert ("kind" in r.to_dict()) == (r.kind == "dfs")  # ps stays written as before kinds


def test_dfs_recipe_shape():
    r = Recipe.from_yaml("""
kind: dfs
sources: {a: m/a, b: m/b}
layers: [[a, 0], [b, 1], [a, 1]]
scales: [1.0, 0.5, 2]
embed_from: b
""")
    assert isinstance(r, DFSRecipe) and r.kind == "dfs"
    assert r.layers == (("a", 0), ("b", 1), ("a", 1)) and r.scales == (1.0, 0.5, 2.0)
    assert r.to_dict() == {"kind": "dfs", "sources": {"a": "m/a", "b": "m/b"},
                           "layers": [["a", 0], ["b", 1], ["a", 1]],
                           "scales": [1.0, 0.5, 2.0], "embed_from": "b"}


def test_inline_recipe_source():
    inner = Recipe(method="ties", sources={"base": "b", "x": "x"}, base_model="base",
                   models={"x": {"weight": 0.5}})
    outer = DFSRecipe(sources={"m": inner.to_dict(), "y": "y"}, layers=[("m", 0), ("y", 3)],
                      scales=[1.0, 1.0], embed_from="m")
    assert outer.sources["m"] == inner
    assert outer.model_sources() == {"m.base": "b", "m.x": "x", "y": "y"}
    assert "kind" not in outer.to_dict()["sources"]["m"]
    with pytest.raises(ValueError, match="Input should be 'ps'"):  # inline sources are ps
        Recipe.from_dict({**outer.to_dict(), "sources": {"m": outer.to_dict()}})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": "dfx"}, "unknown recipe kind 'dfx'. Did you mean 'dfs'?"),
        ({"layers": [["q", 0]], "scales": [1.0]}, r"layers\[0\] names 'q', which is not in"),
        ({"layers": [["a", -1]], "scales": [1.0]}, r"layers\[0\] has layer index -1"),
        ({"scales": [1.0]}, "scales has 1 entries but layers has 2; give one scale per slot"),
        ({"scales": [1.0, float("nan")]}, r"scales\[1\] is nan"),
        ({"embed_from": "z"}, "embed_from 'z' is not in sources"),
        ({"layers": [], "scales": []}, "at least 1 item"),
        ({"method": "linear"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_dfs_recipes(change, message):
    good = {"kind": "dfs", "sources": {"a": "a", "b": "b"}, "layers": [["a", 0], ["b", 1]],
            "scales": [1.0, 1.0], "embed_from": "a"}
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict({**good, **change})


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
