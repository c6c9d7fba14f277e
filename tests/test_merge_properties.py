"""Property tests (hypothesis) of the pure merge on small random state dicts."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.merge.reference import merge_state_dicts
from evomerge.recipe import Recipe

LAYERS = 2
SHAPES = {
    "model.embed_tokens.weight": (5, 4),
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.0.mlp.up_proj.weight": (6, 4),
    "model.layers.1.input_layernorm.weight": (4,),
    "model.layers.1.mlp.down_proj.weight": (4, 6),
    "lm_head.weight": (5, 4),
}
GTA = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
       "della", "della_linear"]
EPSILON = {"della": {"epsilon": 0.0}, "della_linear": {"epsilon": 0.0}}  # any density is valid
NAMES = ["a", "b", "c"]
SETTINGS = settings(max_examples=25, deadline=None)

unit = st.floats(0.0, 1.0, allow_nan=False)
coef = st.one_of(
    unit,
    st.tuples(unit, unit),
    st.fixed_dictionaries({"self_attn": unit, "mlp": st.tuples(unit, unit), "default": unit}),
)


def state_dicts(seed: int, *, same: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    out = {"base": base}
    for name in NAMES:
        out[name] = {k: v if same else v + 0.1 * torch.randn(v.shape, generator=gen)
                     for k, v in base.items()}
    return out


def recipe(method: str, models: dict, **kw) -> Recipe:
    sources = {n: n for n in ["base", *NAMES]}
    return Recipe(method=method, sources=sources, base_model="base", models=models, **kw)


def close(x: dict, y: dict, atol: float = 1e-5) -> bool:
    return all(torch.allclose(x[k], y[k], atol=atol) for k in y)


@SETTINGS
@given(method=st.sampled_from(["linear", *GTA]), seed=st.integers(0, 2**16),
       density=coef, k=st.integers(1, 3))
def test_weight_one_on_a_reproduces_a(method, seed, density, k):
    sds = state_dicts(seed)
    models = {n: {"weight": 1.0 if i == 0 else 0.0} for i, n in enumerate(NAMES[:k])}
    if method != "linear" and method != "task_arithmetic":
        models[NAMES[0]]["density"] = 1.0
        for n in NAMES[1:k]:
            models[n]["density"] = density
            models[n] |= EPSILON.get(method, {})
    out = merge_state_dicts(recipe(method, models), sds, num_layers=LAYERS)
    if method == "linear":  # exact: 1 * A + 0 * others
        assert all(torch.equal(out[key], sds["a"][key]) for key in SHAPES)
    else:
        assert close(out, sds["a"])


@SETTINGS
@given(method=st.sampled_from(GTA), seed=st.integers(0, 2**16), weight=coef, density=coef)
def test_lambda_zero_gives_base(method, seed, weight, density):
    sds = state_dicts(seed)
    params = {"weight": weight} | ({} if method == "task_arithmetic" else {"density": density})
    r = recipe(method, {n: params | EPSILON.get(method, {}) for n in NAMES},
               parameters={"lambda": 0.0})
    out = merge_state_dicts(r, sds, num_layers=LAYERS)
    assert all(torch.equal(out[key], sds["base"][key]) for key in SHAPES)


@SETTINGS
@given(method=st.sampled_from(["linear", "slerp", *GTA]), seed=st.integers(0, 2**16),
       weight=st.floats(0.05, 1.0), density=coef, lam=st.floats(0.0, 2.0))
def test_identical_models_are_a_fixed_point(method, seed, weight, density, lam):
    sds = state_dicts(seed, same=True)
    if method == "slerp":
        r = recipe(method, {"a": {}}, parameters={"t": density})
    elif method == "linear":
        r = recipe(method, {n: {"weight": weight} for n in NAMES})
    else:
        params = {"weight": weight} | ({} if method == "task_arithmetic" else {"density": density})
        r = recipe(method, {n: params | EPSILON.get(method, {}) for n in NAMES},
                   parameters={"lambda": lam})
    assert close(merge_state_dicts(r, sds, num_layers=LAYERS), sds["base"])


@SETTINGS
@given(method=st.sampled_from(["linear", "slerp", *GTA]), seed=st.integers(0, 2**16),
       weight=coef, density=coef, gamma=st.floats(0.0, 0.1), lam=st.floats(0.0, 2.0),
       normalize=st.booleans(), non_layer=st.sampled_from(["first", "base"]))
def test_merges_are_finite(method, seed, weight, density, gamma, lam, normalize, non_layer):
    sds = state_dicts(seed)
    if method == "slerp":
        r = recipe(method, {"a": {}}, parameters={"t": density}, non_layer=non_layer)
    elif method == "linear":  # positive weights: a normalised mean is defined
        models = {n: {"weight": 0.01 + i} for i, n in enumerate(NAMES)}
        models["a"]["weight"] = weight
        r = recipe(method, models, parameters={"normalize": True}, non_layer=non_layer)
    else:
        params = {"weight": weight}
        if method != "task_arithmetic":
            params["density"] = density
        if method.startswith("breadcrumbs"):
            params["gamma"] = gamma
        params |= EPSILON.get(method, {})
        r = recipe(method, {n: params for n in NAMES}, non_layer=non_layer,
                   parameters={"lambda": lam, "normalize": normalize})
    out = merge_state_dicts(r, sds, num_layers=LAYERS)
    assert set(out) == set(SHAPES)
    assert all(torch.isfinite(v).all() for v in out.values())
    if non_layer == "base":
        assert torch.equal(out["lm_head.weight"], sds["base"]["lm_head.weight"])


@SETTINGS
@given(method=st.sampled_from(["della", "della_linear"]), seed=st.integers(0, 2**16),
       density=st.floats(0.2, 0.8), epsilon=st.floats(0.0, 0.15), lam=st.floats(0.0, 2.0))
def test_della_in_its_search_bounds_is_finite_and_seeded(method, seed, density, epsilon, lam):
    sds = state_dicts(seed)
    models = {n: {"weight": 0.5, "density": density, "epsilon": epsilon} for n in NAMES}
    r = recipe(method, models, parameters={"lambda": lam}, seed=seed)
    out = merge_state_dicts(r, sds, num_layers=LAYERS)
    assert all(torch.isfinite(v).all() for v in out.values())
    again = merge_state_dicts(r, sds, num_layers=LAYERS)
    assert all(torch.equal(out[k], again[k]) for k in out)


@SETTINGS
@given(seed=st.integers(0, 2**16), topk=st.floats(0.0, 1.0))
def test_sce_identical_models_are_a_fixed_point(seed, topk):
    sds = state_dicts(seed, same=True)
    r = recipe("sce", {n: {} for n in NAMES}, parameters={"select_topk": topk})
    assert close(merge_state_dicts(r, sds, num_layers=LAYERS), sds["base"])
