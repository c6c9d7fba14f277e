"""The in-place Workspace (fused kernels, caches) against the pure merge, repeatability, subsets,
and merge_to_folder."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from evomerge.merge.methods_spec import METHODS
from evomerge.merge.reference import merge_state_dicts
from evomerge.merge.workspace import Workspace, merge_to_folder
from evomerge.recipe import Recipe

W = {"self_attn": (0.2, 0.9), "mlp": 0.5, "default": 0.7}
RECIPES = {
    "linear": ("linear", {"a": {"weight": (0.2, 0.4, 0.6, 0.8)}, "c": {"weight": W}}, {}),
    "task_arithmetic": ("task_arithmetic", {"a": {"weight": 0.6}, "b": {"weight": W}},
                        {"lambda": 0.7}),
    "ties": ("ties", {"a": {"weight": W, "density": (0.2, 0.6)},
                      "b": {"weight": 0.5, "density": 0.35},
                      "c": {"weight": (1.0, 0.1), "density": {"mlp": 0.1, "default": 0.9}}},
             {"lambda": 1.1}),
    "dare_linear": ("dare_linear", {"a": {"weight": 0.5, "density": 0.4},
                                    "b": {"weight": W, "density": 0.6}}, {}),
    "dare_ties": ("dare_ties", {"a": {"weight": 0.5, "density": (0.3, 0.9)},
                                "c": {"weight": 0.8, "density": 0.5}}, {"normalize": True}),
    "breadcrumbs": ("breadcrumbs", {"b": {"weight": 0.9, "density": 0.7, "gamma": 0.05},
                                    "c": {"weight": W, "density": 0.8}}, {}),
    "slerp": ("slerp", {"c": {}}, {"t": (0.3, 0.6)}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {
        "a": {"weight": W, "density": (0.6, 0.9), "gamma": 0.1},
        "c": {"weight": 0.7, "density": 0.75}}, {"rescale": True}),
    "della": ("della", {"a": {"weight": 0.6, "density": (0.3, 0.7), "epsilon": 0.2},
                        "b": {"weight": W, "density": 0.5}}, {"lambda": 0.9}),
    "della_linear": ("della_linear", {"b": {"weight": 0.8, "density": 0.4, "epsilon": 0.1},
                                      "c": {"weight": W, "density": {"mlp": 0.6,
                                                                     "default": 0.3}}}, {}),
    "sce": ("sce", {"a": {}, "b": {}, "c": {}}, {"select_topk": (0.3, 0.8)}),
}


def make(name: str, sources: dict[str, str], **kw) -> Recipe:
    method, models, params = RECIPES[name]
    return Recipe(method=method, sources=sources, base_model="base", models=models,
                  parameters=params, seed=5, **kw)


@pytest.fixture(scope="module")
def sources(tiny_models) -> dict[str, str]:
    return {name: str(path) for name, path in tiny_models.items()}


@pytest.fixture(scope="module")
def state_dicts(sources):
    return {n: load_file(f"{p}/model.safetensors") for n, p in sources.items()}


@pytest.fixture(scope="module")
def workspace(sources) -> Workspace:
    torch.set_num_threads(1)
    return Workspace(sources, "base")


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(live: dict, pure: dict) -> None:
    """Equal to float32 rounding (the fused kernels order the float ops differently)."""
    assert set(live) == set(pure)
    for key, tensor in pure.items():
        torch.testing.assert_close(live[key], tensor, rtol=1e-5, atol=1e-6, msg=key)


def test_workspace_attributes(workspace, sources):
    assert workspace.names == ["base", "a", "b", "c"]
    assert workspace.num_layers == 4
    assert workspace.tokenizer.get_vocab() and workspace.model.training is False


@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("non_layer", ["first", "base"])
def test_in_place_merge_equals_pure_merge(name, non_layer, workspace, sources, state_dicts):
    recipe = make(name, sources, non_layer=non_layer)
    live = snapshot(workspace.apply(recipe))
    pure = merge_state_dicts(recipe, state_dicts, num_layers=4)
    assert_same(live, pure)  # DARE included: the same masks
    if non_layer == "base":
        assert torch.equal(live["lm_head.weight"], state_dicts["base"]["lm_head.weight"])


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "dare_ties", "dare_linear", "della"])
def test_without_cache_memory_the_result_is_the_same(name, sources, state_dicts,
                                                      uncached_workspace):
    """No memory for caches: ranks sorted again and random levels drawn per candidate."""
    recipe = make(name, sources)
    live = snapshot(uncached_workspace.apply(recipe))
    if name == "della":
        assert not uncached_workspace.della._cached
    else:  # bounds by selection; no tie is cut on these random weights, so no sort at all
        assert uncached_workspace.sorts.cached(METHODS[name].sparsifier) is None
        assert uncached_workspace.sorts.nbytes() == 0
    assert_same(live, merge_state_dicts(recipe, state_dicts, num_layers=4))


@pytest.fixture(scope="module")
def uncached_workspace(sources) -> Workspace:
    return Workspace(sources, "base", cache_bytes=0)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_ties"])
def test_bfloat16_models_merge_in_float32_into_bfloat16(name, sources, state_dicts):
    """A bfloat16 load keeps the task vectors in float32 (from the stored float32 weights), so
    the same entries are trimmed as in the float32 merge and the result is that merge rounded
    to bfloat16, up to the rounding of the base (the live model is bfloat16)."""
    ws = bf16_workspace(sources)
    recipe = make(name, sources)
    live = snapshot(ws.apply(recipe))
    pure = merge_state_dicts(recipe, state_dicts, num_layers=4)
    for key, tensor in pure.items():
        assert live[key].dtype == torch.bfloat16
        err = (live[key].float() - tensor).abs()
        ulp = tensor.abs() * 2.0**-7 + state_dicts["base"][key].abs() * 2.0**-8 + 1e-30
        assert (err <= ulp).all(), (key, float((err / ulp).max()))


_BF16: dict = {}


def bf16_workspace(sources) -> Workspace:
    from evomerge.config import LoadConfig

    if "ws" not in _BF16:
        _BF16["ws"] = Workspace(sources, "base", load=LoadConfig(dtype="bfloat16"))
    return _BF16["ws"]


def sweep_recipe(method: str, sources: dict, k: int, normalize: bool, seed: int) -> Recipe:
    """Per-layer weights (one negative), per-layer densities < 1, K = k experts."""
    gen = torch.Generator().manual_seed(seed)

    def draw(low: float, high: float) -> tuple[float, ...]:
        return tuple(round(low + (high - low) * float(x), 4) for x in torch.rand(4, generator=gen))

    models = {}
    for i, m in enumerate(["a", "b", "c"][:k]):
        models[m] = {"weight": draw(-0.3, 1.0) if i == 1 else draw(0.2, 1.0)}
        if method not in ("linear", "task_arithmetic"):
            models[m]["density"] = draw(0.1, 0.9)
        if method.startswith("breadcrumbs"):
            models[m]["gamma"] = draw(0.0, 0.1)
        if method.startswith("della"):
            models[m]["density"] = draw(0.3, 0.7)
            models[m]["epsilon"] = draw(0.0, 0.25)
    params: dict = {"normalize": normalize}
    if method != "linear":
        params["lambda"] = 0.8
    if method not in ("linear", "task_arithmetic"):
        params["rescale"] = not normalize
    return Recipe(method=method, sources=sources, base_model=None if method == "linear" else
                  "base", models=models, parameters=params, seed=seed)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "breadcrumbs",
                                    "breadcrumbs_ties", "dare_linear", "dare_ties", "della",
                                    "della_linear"])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("normalize", [False, True])
def test_fast_path_equals_reference_sweep(method, k, normalize, workspace, sources,
                                          state_dicts):
    """Per-layer coefficients, normalize on/off, rescale off/on, K = 2 and 3, densities < 1."""
    for seed in (1, 2):
        recipe = sweep_recipe(method, sources, k, normalize, seed)
        live = snapshot(workspace.apply(recipe))
        pure = merge_state_dicts(recipe, state_dicts, num_layers=4)
        assert_same(live, pure)
        assert any(not torch.equal(live[n], state_dicts["base"][n]) for n in pure)


def test_dare_masks_follow_the_recipe_seed_with_nothing_cached(workspace, sources, state_dicts):
    recipe = make("dare_ties", sources)
    before = workspace.held_bytes()["caches"]
    first = snapshot(workspace.apply(recipe))
    assert workspace.held_bytes()["caches"] == before  # levels are hashed, never stored
    other = recipe.model_copy(update={"seed": 6})
    live = snapshot(workspace.apply(other))
    assert any(not torch.equal(live[n], first[n]) for n in live)
    assert_same(live, merge_state_dicts(other, state_dicts, num_layers=4))


def test_apply_x_y_x_gives_x_exactly(workspace, sources):
    x, y = make("ties", sources), make("dare_ties", sources)
    first = snapshot(workspace.apply(x))
    workspace.apply(y)
    workspace.apply(make("linear", sources))
    again = snapshot(workspace.apply(x))
    assert all(torch.equal(again[k], v) for k, v in first.items())  # bit for bit


def test_expert_alone_and_subsets(workspace, sources, state_dicts):
    alone = Recipe(method="linear", sources=sources, models={"b": {"weight": 1.0}})
    live = snapshot(workspace.apply(alone))
    for key, tensor in state_dicts["b"].items():
        torch.testing.assert_close(live[key], tensor, rtol=0, atol=1e-7)
    # a recipe over a subset: the unused source contributes nothing
    subset = make("task_arithmetic", sources)
    sub_sources = {k: v for k, v in sources.items() if k in ("base", "a", "b")}
    pure = merge_state_dicts(subset, {k: state_dicts[k] for k in sub_sources}, num_layers=4)
    assert_same(snapshot(workspace.apply(subset)), pure)


def test_merged_model_runs(workspace, sources):
    model = workspace.apply(make("ties", sources))
    ids = workspace.tokenizer("12+34=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_recipe_must_match_the_loaded_sources(workspace, sources):
    moved = dict(sources, a="/somewhere/else")
    with pytest.raises(ValueError, match="somewhere/else"):
        workspace.apply(make("ties", moved))
    other_base = Recipe(method="task_arithmetic", sources=sources, base_model="a",
                        models={"b": {"weight": 1.0}})
    with pytest.raises(ValueError, match="base_model='a'"):
        workspace.apply(other_base)
    with pytest.raises(ValueError, match="exactly 1"):
        workspace.apply(Recipe(method="slerp", sources=sources, base_model="base",
                               models={"a": {}, "b": {}}))


def test_merge_to_folder_loads_with_transformers(tmp_path, sources, state_dicts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = make("ties", sources)
    out = merge_to_folder(recipe, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(out)
    pure = merge_state_dicts(recipe, state_dicts, num_layers=4)
    assert_same(model.state_dict(), pure)
    assert any(p.suffix == ".safetensors" for p in out.iterdir())
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(sources["base"]).get_vocab()
    with pytest.raises(ValueError, match="is source 'a'"):
        merge_to_folder(recipe, sources["a"])


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "breadcrumbs_ties", "dare_ties",
                                  "della"])
def test_compiled_kernels_equal_the_reference(name, workspace, sources, state_dicts,
                                              monkeypatch):
    """Big tensors run through ``torch.compile``; force it on the tiny model's tensors."""
    from evomerge.merge import kernels

    monkeypatch.setattr(kernels, "COMPILE_MIN_NUMEL", 0)
    recipe = make(name, sources)
    live = snapshot(workspace.apply(recipe))
    assert_same(live, merge_state_dicts(recipe, state_dicts, num_layers=4))
    assert kernels._COMPILED and not kernels._EAGER  # compiled here (a C++ compiler is present)


def test_merge_cache_bytes_from_the_load_config(sources):
    from evomerge.config import LoadConfig

    ws = Workspace(sources, "base", load=LoadConfig(merge_cache_bytes=0))
    ws.apply(make("della", sources))
    assert not ws.della._cached and ws.held_bytes()["caches"] == 0


@pytest.fixture(scope="module")
def grid(tiny_models, tmp_path_factory) -> tuple[dict[str, str], dict]:
    """The tiny models rounded to a 1/64 grid: task vectors full of ties."""
    import shutil

    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("grid")
    sources, sds = {}, {}
    for model in ("base", "a", "c"):
        weights = load_file(f"{tiny_models[model]}/model.safetensors")
        sds[model] = {k: torch.round(v * 64) / 64 for k, v in weights.items()}
        shutil.copytree(tiny_models[model], root / model)
        save_file(sds[model], str(root / model / "model.safetensors"), metadata={"format": "pt"})
        sources[model] = str(root / model)
    return sources, sds


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties"])
@pytest.mark.parametrize("cache_bytes", [None, 0])
def test_tied_task_vectors_keep_the_references_entries(name, cache_bytes, grid):
    """Task vectors on a 1/64 grid tie the trim bounds in every tensor: the fused pass keeps
    the tied entries, then the cut tie groups are rewritten with mergekit's choice."""
    sources, sds = grid
    ws = Workspace(sources, "base", cache_bytes=cache_bytes)
    recipe = Recipe(method=name, sources=sources, base_model="base", parameters={"rescale": True},
                    models={"a": {"weight": 0.8, "density": (0.55, 0.7)},
                            "c": {"weight": W, "density": 0.6}})
    live = snapshot(ws.apply(recipe))
    assert ws.sorts.cached(METHODS[name].sparsifier) is (cache_bytes is None)
    pure = merge_state_dicts(recipe, sds, num_layers=4)
    assert_same(live, pure)


@pytest.mark.parametrize("cache_bytes", [None, 0])
def test_sce_from_the_cached_variance_is_bitwise_the_reference(cache_bytes, grid):
    """Tied variances on the grid: a threshold where it cuts no tie, ``torch.topk`` where it
    does; the same float32 operations as the reference, so bit for bit."""
    sources, sds = grid
    ws = Workspace(sources, "base", cache_bytes=cache_bytes)
    for topk in [(0.3, 0.55, 0.8, 0.97), {"mlp": 0.25, "default": 0.6}, 1.0]:
        recipe = Recipe(method="sce", sources=sources, base_model="base",
                        models={"a": {}, "c": {}}, parameters={"select_topk": topk})
        live = snapshot(ws.apply(recipe))
        pure = merge_state_dicts(recipe, sds, num_layers=4)
        assert all(torch.equal(live[k], v) for k, v in pure.items())
    assert bool(ws.sce._cached) is (cache_bytes is None)
