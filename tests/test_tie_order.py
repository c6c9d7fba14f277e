"""``load.tie_order: index``: where a trim bound cuts a group of equal magnitudes, keep
mergekit's count of that group's entries, the ones with the lowest flat indices (no sort).

The experts here are LoRA-like (projections only) but on a grid: base weights and deltas are
multiples of 2**-10, so task vectors are exact and have a handful of distinct magnitudes, and
every trim bound cuts a tie group; merges with weights 1 and 0.5 are exact in float32, so the
Workspace is compared bit for bit with a reference built on ``argsort(stable=True)``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from evomerge.config import ConfigError, LoadConfig, parse_job
from evomerge.merge import merge_methods as mm
from evomerge.merge import trimming
from evomerge.merge.workspace import Workspace
from evomerge.recipe import Recipe
from tests.conftest import make_tiny_arch

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STEP = 2.0**-10
DENSITIES = (0.05, 0.3, 0.5, 0.77)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A tiny Llama with grid weights and two grid LoRA-like experts, saved; (sources, sds)."""
    root = tmp_path_factory.mktemp("tie_grid")
    base, tok = make_tiny_arch("llama_gqa", seed=0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.round(p / STEP) * STEP)
    models = {"base": base}
    for name in ("a", "b"):
        models[name] = copy.deepcopy(base)
        with torch.no_grad():
            for key, p in models[name].named_parameters():
                if p.dim() == 2 and any(f".{t}." in key for t in PROJ):
                    p.add_(torch.randint(-4, 5, p.shape, generator=gen).float() * STEP)
    sources = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        sources[name] = str(root / name)
    return sources, {n: load_file(f"{p}/model.safetensors") for n, p in sources.items()}


def tied_vectors():
    """Magnitudes with heavy ties: a grid task vector's size and one that brackets by a
    sample (more than 4 x trimming.SAMPLE entries)."""
    gen = torch.Generator().manual_seed(0)
    small = torch.randint(0, 5, (2048,), generator=gen).float() * STEP
    big = torch.randint(0, 400, (5 * trimming.SAMPLE + 3,), generator=gen).float() * 1e-4
    return [small, big]


@pytest.mark.parametrize("kind", ["magnitude", "outliers"])
def test_index_keeps_mergekits_count_and_the_lowest_indices_of_a_cut_group(kind):
    for a in tied_vectors():
        for density in DENSITIES:
            want = trimming.trim_mask(a, method=kind, density=density, gamma=0.05)
            got = trimming.trim_mask(a, method=kind, density=density, gamma=0.05,
                                     tie_order="index")
            assert int(got.sum()) == int(want.sum())
            window = trimming.rank_window(kind, a.numel(), density=density, gamma=0.05)
            b = trimming.window_bounds(kind, a, window)
            assert b.cut and b.groups  # these magnitudes always cut a tie group
            assert got[(a > b.lo) & (a < b.hi)].all()
            assert not got[(a < b.lo) | (a > b.hi)].any()
            for value in {b.lo, b.hi}:
                group = torch.nonzero(a == value).flatten()  # ascending flat indices
                if group.numel() == 0:
                    continue
                kept = int(want[group].sum())  # mergekit's count for this group ...
                assert int(got[group].sum()) == kept
                assert got[group[:kept]].all()  # ... taken from its lowest indices
                assert not got[group[kept:]].any()


def test_index_order_of_ties_is_a_stable_descending_argsort():
    for a in tied_vectors():
        order = torch.argsort(a, descending=True, stable=True)
        for density in DENSITIES:
            k = max(1, int(density * a.numel()))
            want = torch.zeros_like(a, dtype=torch.bool)
            want[order[:k]] = True
            got = trimming.trim_mask(a, method="magnitude", density=density, tie_order="index")
            assert torch.equal(got, want)


def stable_ties_merge(sds: dict, models: dict, normalize: bool) -> dict:
    """TIES with each task vector trimmed to the first ``max(1, int(d n))`` entries of
    ``argsort(|tau|, descending=True, stable=True)``, then mergekit's sign election."""
    out = {}
    for key, base in sds["base"].items():
        layer = int(key.split(".")[2]) if key.startswith("model.layers.") else 0
        taus, weights = [], []
        for name, p in models.items():
            tau = (sds[name][key].float() - base.float()).reshape(-1)
            d = p["density"][layer // 2] if isinstance(p["density"], tuple) else p["density"]
            order = torch.argsort(tau.abs(), descending=True, stable=True)
            keep = torch.zeros_like(tau)
            keep[order[:max(1, int(d * tau.numel()))]] = 1
            taus.append(tau * keep)
            weights.append(p["weight"])
        merged = mm.combine(base.float().reshape(-1), torch.stack(taus), weights,
                            consensus=True, normalize=normalize)
        out[key] = merged.reshape(base.shape)
    return out


def test_workspace_index_order_equals_a_stable_argsort_ties_bit_for_bit(grid):
    sources, sds = grid
    models = {"a": {"weight": 1.0, "density": (0.3, 0.55)}, "b": {"weight": 0.5, "density": 0.2}}
    recipe = Recipe(method="ties", sources=sources, base_model="base", models=models,
                    parameters={"normalize": False})
    ws = Workspace(sources, "base", load=LoadConfig(tie_order="index"))
    live = ws.apply(recipe).state_dict()
    want = stable_ties_merge(sds, models, normalize=False)
    cut = 0
    for key, tensor in want.items():
        assert torch.equal(live[key], tensor), key
    for key in ws._deltas:
        for row in range(2):
            cut += trimming.window_bounds(
                "magnitude", ws._deltas[key][row].abs(),
                trimming.rank_window("magnitude", ws._deltas[key][row].numel(),
                                     density=0.2)).cut
    assert cut > 0  # the grid makes bounds cut tie groups
    assert ws.sorts.cached("magnitude") is None and ws.sorts.nbytes() == 0  # never sorted


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_workspace_index_order_with_rescale_matches_the_index_reference(method, grid):
    """Rescale and both ends of breadcrumbs' window: the Workspace equals the reference merge
    sparsified by ``trim_mask(tie_order="index")``, and ``mergekit`` order still equals
    mergekit's mask (the kept sets differ only inside tie groups, with the same counts)."""
    sources, sds = grid
    models = {"a": {"weight": 0.7, "density": 0.6}, "b": {"weight": 0.4, "density": 0.85}}
    if method == "breadcrumbs_ties":
        models["a"]["gamma"], models["b"]["gamma"] = 0.05, 0.1
    recipe = Recipe(method=method, sources=sources, base_model="base", models=models,
                    parameters={"rescale": True, "normalize": True})
    kind = "magnitude" if method == "ties" else "outliers"
    results = {}
    for order in ("index", "mergekit"):
        ws = Workspace(sources, "base", load=LoadConfig(tie_order=order))
        results[order] = {k: v.clone() for k, v in ws.apply(recipe).state_dict().items()}
    differs = 0
    for key, base in sds["base"].items():
        if all(torch.equal(sds[m][key], base) for m in "ab"):
            continue
        for order, live in results.items():
            taus = torch.stack([(sds[m][key].float() - base.float()).reshape(-1) for m in "ab"])
            for k, m in enumerate("ab"):
                keep = trimming.trim_mask(taus[k].abs(), method=kind,
                                          density=models[m]["density"],
                                          gamma=models[m].get("gamma", 0.0), tie_order=order)
                mm.apply_mask(taus[k], keep, rescale=True, inplace=True)
            want = mm.combine(base.float().reshape(-1), taus, [0.7, 0.4], consensus=True,
                              normalize=True).reshape(base.shape)
            torch.testing.assert_close(live[key], want, rtol=1e-6, atol=1e-7, msg=key)
        differs += not torch.equal(results["index"][key], results["mergekit"][key])
    assert differs > 0  # mergekit's argsort does not keep the lowest indices


def test_tie_order_refused_with_the_key_and_the_choices():
    job = {"name": "demo",
           "models": {"base": {"path": "b"}, "experts": {"x": {"path": "x"}}},
           "evaluators": [{"name": "accuracy", "data": "data/x"}],
           "objectives": [{"metric": "accuracy/x"}],
           "load": {"tie_order": "stable"}}
    with pytest.raises(ConfigError) as info:
        parse_job(job)
    message = str(info.value)
    assert "\n" not in message
    assert "load.tie_order" in message and "'mergekit'" in message and "'index'" in message
    assert parse_job({**job, "load": {"tie_order": "index"}}).load.tie_order == "index"
    with pytest.raises(ValueError, match="unknown tie order 'stable'"):
        trimming.trim_mask(torch.ones(4), method="magnitude", density=0.5, tie_order="stable")


def test_mergekit_export_says_index_order_differs_in_tied_entries_only(grid, tmp_path):
    from evomerge.runs.export import export_recipe

    sources, _ = grid
    models = {"a": {"weight": 1.0, "density": 0.4}, "b": {"weight": 0.5, "density": 0.6}}
    ties = Recipe(method="ties", sources=sources, base_model="base", models=models)
    out = export_recipe(ties, tmp_path / "index.yaml", "mergekit",
                        load=LoadConfig(tie_order="index"))
    text = out.read_text()
    assert "load.tie_order: index" in text and "tied entries" in text
    assert "tie_order" not in export_recipe(ties, tmp_path / "mk.yaml", "mergekit").read_text()
    plain = Recipe(method="task_arithmetic", sources=sources, base_model="base",
                   models={"a": {"weight": 1.0}})
    text = export_recipe(plain, tmp_path / "ta.yaml", "mergekit",
                         load=LoadConfig(tie_order="index")).read_text()
    assert "tie_order" not in text  # nothing is trimmed, nothing differs


def test_evomerge_merge_takes_the_tie_order(grid, tmp_path):
    """``evomerge merge --tie-order index`` writes the weights a search with
    ``load.tie_order: index`` merged (bit for bit); without it, mergekit's order (they differ
    on the grid, where trim bounds cut tie groups); the recipe export says which to give."""
    from safetensors.torch import load_file

    from evomerge import cli
    from evomerge.runs.export import export_recipe

    sources, sds = grid
    models = {"a": {"weight": 1.0, "density": (0.3, 0.55)}, "b": {"weight": 0.5, "density": 0.2}}
    recipe = Recipe(method="ties", sources=sources, base_model="base", models=models,
                    parameters={"normalize": False})
    saved = tmp_path / "recipe.yaml"
    export_recipe(recipe, saved, "recipe", load=LoadConfig(tie_order="index"))
    assert "evomerge merge THIS_FILE OUT/ --tie-order index" in saved.read_text()
    assert cli.main(["merge", str(saved), str(tmp_path / "index"), "--tie-order", "index"]) == 0
    assert cli.main(["merge", str(saved), str(tmp_path / "mergekit")]) == 0
    index = load_file(str(tmp_path / "index" / "model.safetensors"))
    default = load_file(str(tmp_path / "mergekit" / "model.safetensors"))
    want = stable_ties_merge(sds, models, normalize=False)
    for key, tensor in want.items():
        assert torch.equal(index[key], tensor), key
    assert any(not torch.equal(default[k], index[k]) for k in want)
