"""Numeric agreement with mergekit 0.1.5 (its in-process ``run_merge``) on the tiny models.

Each recipe is written as a mergekit config by a small converter in this file (per-group tuples
expanded to one value per layer, kind mappings to ``{filter, value}`` lists), merged by mergekit,
and compared with both the pure :func:`merge_state_dicts` and the in-place Workspace.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from evomerge.merge.coefficients import per_layer
from evomerge.merge.reference import merge_state_dicts
from evomerge.merge.workspace import Workspace
from evomerge.recipe import Recipe

LAYERS = 4
KINDS = {"self_attn": 0.3, "mlp": (0.5, 1.0), "default": 0.8}
CASES = {
    "linear_per_layer_and_kinds": ("linear", {
        "a": {"weight": (0.2, 0.5, 0.7, 1.0)}, "b": {"weight": 0.3}, "c": {"weight": KINDS}}, {}),
    "linear_sum_two_groups": ("linear", {
        "a": {"weight": (0.2, 0.5)}, "b": {"weight": 0.3}}, {"normalize": False}),
    "task_arithmetic": ("task_arithmetic", {
        "a": {"weight": (0.2, 0.5, 0.7, 1.0)}, "b": {"weight": KINDS}}, {"lambda": 0.8}),
    "ties_per_layer_density_kinds": ("ties", {
        "a": {"weight": (0.2, 0.5, 0.7, 1.0), "density": 0.3},
        "b": {"weight": KINDS, "density": (0.5, 0.9)},
        "c": {"weight": 0.6, "density": {"mlp": 0.2, "default": 0.7}}}, {"lambda": 1.2}),
    "ties_rescale_no_normalize": ("ties", {
        "a": {"weight": 0.7, "density": 0.3}, "b": {"weight": 0.4, "density": 0.6}},
        {"normalize": False, "rescale": True}),
    "ties_global_density": ("ties", {
        "a": {"weight": 1.0}, "b": {"weight": 0.5}}, {"density": (0.2, 0.4, 0.6, 0.8)}),
    "breadcrumbs": ("breadcrumbs", {
        "a": {"weight": 0.7, "density": 0.8, "gamma": 0.05},
        "b": {"weight": KINDS, "density": (0.6, 0.9),
              "gamma": {"self_attn": 0.1, "default": 0.02}}}, {}),
    "slerp_per_layer": ("slerp", {"a": {}}, {"t": (0.1, 0.5, 0.9, 0.3)}),
    "slerp_kinds": ("slerp", {"b": {}}, {"t": {"self_attn": 0.2, "mlp": (0.4, 0.8),
                                                "default": 0.6}}),
}


def recipe_for(case: str, sources: dict[str, str]) -> Recipe:
    method, models, params = CASES[case]
    base = None if method == "linear" else "base"
    return Recipe(method=method, sources=sources, base_model=base, models=models,
                  parameters=params)


def setting(value):
    if isinstance(value, dict):
        conds = [{"filter": k, "value": setting(v)} for k, v in value.items() if k != "default"]
        return conds + [{"value": setting(value["default"])}] if "default" in value else conds
    if isinstance(value, tuple):
        return list(per_layer(value, LAYERS))
    return value


def mergekit_config(recipe: Recipe) -> dict:
    cfg = {
        "merge_method": recipe.method,
        "dtype": "float32",
        "models": [
            {"model": recipe.sources[m], "parameters": {k: setting(v) for k, v in p.items()}}
            for m, p in recipe.models.items()
        ],
        "parameters": {k: setting(v) for k, v in recipe.parameters.items()},
    }
    if recipe.base_model:
        cfg["base_model"] = recipe.sources[recipe.base_model]
    return cfg


def run_mergekit(cfg: dict, out) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(lazy_unpickle=False, quiet=True, copy_tokenizer=False)
    run_merge(MergeConfiguration.model_validate(cfg), str(out), options)
    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def sources(tiny_models) -> dict[str, str]:
    return {name: str(path) for name, path in tiny_models.items()}


@pytest.fixture(scope="module")
def state_dicts(sources):
    return {n: load_file(f"{p}/model.safetensors") for n, p in sources.items()}


@pytest.fixture(scope="module")
def workspace(sources):
    torch.set_num_threads(1)
    return Workspace(sources, "base")


@pytest.fixture(scope="module")
def mergekit_outputs(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit")
    return {c: run_mergekit(mergekit_config(recipe_for(c, sources)), root / c) for c in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_pure_and_workspace_match_mergekit(case, sources, state_dicts, workspace,
                                           mergekit_outputs):
    recipe = recipe_for(case, sources)
    theirs = mergekit_outputs[case]
    ours = merge_state_dicts(recipe, state_dicts, num_layers=LAYERS)
    live = workspace.apply(recipe).state_dict()
    assert set(theirs) == set(ours)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(live[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # every setting had an effect: the merge is none of its inputs
    for source in state_dicts.values():
        assert any(not torch.equal(ours[n], source[n]) for n in ours)


def test_per_layer_values_reach_the_layers(sources, mergekit_outputs, state_dicts):
    """The per-layer slerp t: layer 0 (t=0.1) stays closer to the base than layer 2 (t=0.9)."""
    out, base, a = mergekit_outputs["slerp_per_layer"], state_dicts["base"], state_dicts["a"]

    def frac(layer: int) -> float:
        n = f"model.layers.{layer}.mlp.up_proj.weight"
        return float((out[n] - base[n]).norm() / (a[n] - base[n]).norm())

    assert frac(0) < 0.2 < 0.8 < frac(2)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_statistics_match_mergekit(method, sources, state_dicts, workspace,
                                        tmp_path_factory):
    """Masks are random in both; compare drop rate and preserved L1 norm/mean per tensor."""
    recipe = Recipe(method=method, sources=sources, base_model="base", seed=7,
                    models={"a": {"weight": 1.0, "density": 0.3}})
    theirs = run_mergekit(mergekit_config(recipe), tmp_path_factory.mktemp(method))
    live = {k: v.clone() for k, v in workspace.apply(recipe).state_dict().items()}
    name = "model.layers.1.mlp.down_proj.weight"
    base, tau = state_dicts["base"][name], state_dicts["a"][name] - state_dicts["base"][name]
    for merged in (theirs[name], live[name]):
        delta = merged - base
        assert (delta.abs() < 1e-9).float().mean().item() == pytest.approx(0.7, abs=0.04)
        assert delta.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-3)
        # mean preserved within 4 standard errors of a kept-and-rescaled mean
        stderr = (tau.pow(2).mean() / 0.3 / tau.numel()).sqrt().item()
        assert abs(delta.mean().item() - tau.mean().item()) < 4 * stderr
    again = workspace.apply(recipe).state_dict()
    assert all(torch.equal(again[k], v) for k, v in live.items())
    other = workspace.apply(recipe.model_copy(update={"seed": 8})).state_dict()
    assert not torch.equal(other[name], live[name])
