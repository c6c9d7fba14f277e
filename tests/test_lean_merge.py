"""The Workspace lean on memory and fast on the first trimming apply (issue 17, item 5).

Experts here are LoRA-like: they change the attention and MLP projections only, as a LoRA
fine-tune does, so embeddings and norms are the base's in every model. Checked: such tensors get
no task vector and no second copy and merge to the base; trim bounds found by selection equal
those of the full sort, ties included; a bfloat16 load keeps float32 task vectors; the bytes the
Workspace holds stay within (K + 2) x the model plus the cache budget.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from evomerge.config import LoadConfig
from evomerge.merge import trimming
from evomerge.merge.reference import merge_state_dicts
from evomerge.merge.workspace import Workspace
from evomerge.recipe import Recipe
from tests.conftest import make_tiny_arch

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_like(model, seed: int, scale: float = 2e-5):
    """A copy of ``model`` plus a rank-2 delta on every projection weight (nothing else)."""
    import copy

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.dim() == 2 and any(f".{t}." in name for t in PROJ):
                a = torch.randn(2, p.shape[1], generator=gen)
                b = torch.randn(p.shape[0], 2, generator=gen) * scale
                p.add_(b @ a)
    return out


@pytest.fixture(scope="module", params=["llama_gqa", "qwen2_tied"])
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"lora_{request.param}")
    base, tok = make_tiny_arch(request.param, seed=0)
    models = {"base": base, "a": lora_like(base, 1), "b": lora_like(base, 2)}
    sources = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        sources[name] = str(root / name)
    sds = {n: load_file(f"{p}/model.safetensors") for n, p in sources.items()}
    return sources, sds


def recipe(method: str, sources: dict, **params) -> Recipe:
    models = {"a": {"weight": (0.9, 0.4)}, "b": {"weight": 0.6}}
    if method not in ("task_arithmetic", "linear"):
        models["a"]["density"], models["b"]["density"] = (0.3, 0.7), 0.5
    return Recipe(method=method, sources=sources, base_model="base", models=models,
                  parameters=params, seed=3)


def unchanged(sds: dict) -> set[str]:
    return {k for k, v in sds["base"].items() if all(torch.equal(sds[m][k], v) for m in "ab")}


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "breadcrumbs_ties"])
def test_unchanged_tensors_are_held_once_and_merge_to_the_base(method, family):
    sources, sds = family
    ws = Workspace(sources, "base")
    same = unchanged(sds)
    assert same and any("norm" in n for n in same) and any("embed" in n for n in same)
    params = dict(ws.model.named_parameters())
    for name in params:
        if name in same:
            assert name not in ws._deltas
            assert ws._base[name].data_ptr() == params[name].data_ptr()  # no second copy
        else:
            assert ws._deltas[name].shape[0] == 2
    live = {k: v.detach().clone() for k, v in ws.apply(recipe(method, sources)).state_dict()
            .items()}
    pure = merge_state_dicts(recipe(method, sources), sds, num_layers=4)
    for key, tensor in pure.items():
        torch.testing.assert_close(live[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
        if key in same:
            assert torch.equal(live[key], sds["base"][key]), key


def test_a_linear_merge_scaling_the_base_detaches_a_copy_first(family):
    """Non-normalised linear weights summing to 1.5 scale an unchanged tensor: the Workspace
    keeps the base (a copy, made then) and a later TIES merge gives it back exactly."""
    sources, sds = family
    ws = Workspace(sources, "base")
    scaled = Recipe(method="linear", sources=sources, models={
        "base": {"weight": 0.5}, "a": {"weight": 0.6}, "b": {"weight": 0.4}},
        parameters={"normalize": False})
    live = {k: v.clone() for k, v in ws.apply(scaled).state_dict().items()}
    norm = "model.norm.weight"
    torch.testing.assert_close(live[norm], sds["base"][norm] * 1.5)
    assert ws._base[norm].data_ptr() != dict(ws.model.named_parameters())[norm].data_ptr()
    again = ws.apply(recipe("ties", sources)).state_dict()
    assert torch.equal(again[norm], sds["base"][norm])


GRID_SIZES = [7, 1000, 3 * trimming.SAMPLE * 4 + 11]  # the last one brackets by a sample


@pytest.mark.parametrize("n", GRID_SIZES)
@pytest.mark.parametrize("kind", ["magnitude", "outliers"])
def test_selected_bounds_equal_the_sorted_ones_ties_included(n, kind):
    """Magnitudes on a coarse grid (many ties, zeros among them): where no tie group is cut
    the kept set ``lo <= |tau| <= hi`` is exactly mergekit's rank window; where one is, the
    selection says so (the Workspace then takes mergekit's order)."""
    gen = torch.Generator().manual_seed(n)
    for levels in (8, 1 << 20):
        a = torch.randint(0, levels, (n,), generator=gen).float() / levels
        ranks = trimming.ranks_for(kind, a)
        s = trimming.sorted_magnitudes(kind, a)
        for density in (0.05, 0.3, 0.5, 0.77, 0.95):
            window = trimming.rank_window(kind, n, density=density, gamma=0.03)
            if window is None or window[0] == window[1]:
                continue
            b = trimming.window_bounds(kind, a, window, l1=True)
            want = trimming.window_mask(ranks, *window)
            got = (a >= b.lo) & (a <= b.hi)
            cut = [g for g in trimming.partial_ties(s, window) if float(a[g[0][0]]) > 0]
            assert b.cut == bool(cut), (levels, density)
            if not b.cut:  # zeros kept or not add nothing: compare the non-zero entries
                assert torch.equal(got & (a > 0), want & (a > 0)), (levels, density)
                assert math.isclose(b.l1[0], float(a[want].double().sum()), rel_tol=1e-9)
                assert math.isclose(b.l1[1], float(a.double().sum()), rel_tol=1e-9)


def test_first_trim_apply_sorts_only_where_a_tie_is_cut(family):
    """Continuous task vectors: no TIES bound cuts a tie, so the first apply sorts nothing and
    holds no cache; the result is the reference merge's."""
    sources, sds = family
    ws = Workspace(sources, "base")
    live = ws.apply(recipe("ties", sources)).state_dict()
    assert ws.sorts.cached("magnitude") is None and ws.held_bytes()["caches"] == 0
    pure = merge_state_dicts(recipe("ties", sources), sds, num_layers=4)
    for key, tensor in pure.items():
        torch.testing.assert_close(live[key], tensor, rtol=1e-5, atol=1e-6, msg=key)


def test_a_bfloat16_load_keeps_float32_task_vectors(family):
    """The experts change the weights by ~0.1-0.2 %, below bfloat16's resolution: a task vector of
    bfloat16 weights loses most of it; the Workspace's equals ``theta - base`` in float32."""
    sources, sds = family
    ws = Workspace(sources, "base", load=LoadConfig(dtype="bfloat16"))
    assert next(ws.model.parameters()).dtype == torch.bfloat16
    assert ws.task_vector_dtype == torch.float32
    worst_rounded = 0.0
    for name in ws._deltas:
        for row, m in enumerate("ab"):
            true = sds[m][name] - sds["base"][name]
            assert torch.equal(ws.task_vector(name, row), true), name
            rounded = sds[m][name].bfloat16().float() - sds["base"][name].bfloat16().float()
            worst_rounded = max(worst_rounded, float((rounded - true).norm() / true.norm()))
    assert worst_rounded > 0.05  # what a bfloat16 task vector would have lost


@pytest.mark.parametrize("cache_bytes", [0, 1 << 16, None])
def test_held_bytes_stay_within_k_plus_2_models_and_the_cache_budget(family, cache_bytes):
    """Counted on the tensors the Workspace holds (not RSS, which a busy machine blurs)."""
    sources, _ = family
    ws = Workspace(sources, "base", cache_bytes=cache_bytes)
    model = ws.held_bytes()["model"]
    for method in ("ties", "dare_ties", "breadcrumbs_ties", "della"):
        ws.apply(recipe(method, sources))
    held = ws.held_bytes()
    k = len(ws.names) - 1
    assert held["model"] == model == sum(p.numel() * 4 for p in ws.model.parameters())
    changed = sum(ws._base[n].numel() * 4 for n in ws._deltas)
    assert held["base"] == changed and held["task_vectors"] == k * changed < k * model
    if cache_bytes is not None:  # the budget caps each cache
        assert all(c.nbytes() <= cache_bytes for c in (ws.sorts, ws.della, ws.sce))
    assert held["model"] + held["base"] + held["task_vectors"] <= (k + 2) * model


def test_pickle_weights_take_the_whole_model_path_with_the_same_task_vectors(family, tmp_path):
    """A source with no safetensors (here .bin, allowed) is loaded whole; same task vectors."""
    import shutil

    sources, sds = family
    shutil.copytree(sources["a"], tmp_path / "a_bin")
    (tmp_path / "a_bin" / "model.safetensors").unlink()
    torch.save(sds["a"], tmp_path / "a_bin" / "pytorch_model.bin")
    fast = Workspace({"base": sources["base"], "a": sources["a"]}, "base")
    slow = Workspace({"base": sources["base"], "a": str(tmp_path / "a_bin")}, "base",
                     load=LoadConfig(allow_pickle=True))
    assert set(fast._deltas) == set(slow._deltas)
    for name, stored in fast._deltas.items():
        assert torch.equal(stored, slow._deltas[name]), name
