"""Numeric agreement with mergekit 0.1.5 on tiny models of two architectures (Llama with GQA,
Qwen2 with tied embeddings), for every task-arithmetic-family method and its flags.

Each recipe (per-layer lists, module-kind values) is written as a mergekit config by evomerge's
own exporter (:func:`evomerge.runs.export_mergekit.mergekit_config`), merged once by mergekit's
in-process ``run_merge`` (one case also by the ``mergekit-yaml`` CLI on the exported YAML), and
compared tensor by tensor with the pure :func:`merge_state_dicts` and the in-place Workspace.

- Deterministic methods run on a *grid* family: every weight rounded to a multiple of 1/256, so
  task vectors are on a grid and ``|tau|`` ties the trim threshold everywhere (as bf16 or
  quantised checkpoints do). The pure merge equals mergekit **bitwise**; the Workspace (fused
  kernels, another order of the float32 operations) to ``rtol=1e-5, atol=1e-6`` float32, which
  still fails on any entry kept differently (task-vector entries are ~4e-3 and larger).
- Random methods (dare_*, della*) draw masks from different generators (mergekit: torch's
  global RNG, ``random_seed=RANDOM_SEED``; evomerge: per (recipe seed ``SEED``, tensor, model)),
  so they are compared **statistically** on the raw family (no zero task-vector entries): kept
  fraction per density, L1 norm restored by ``rescale``, and DELLA's higher keep rate for larger
  magnitudes; evomerge's pure merge and Workspace draw the same masks and agree to float32.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.merge.coefficients import resolve
from evomerge.merge.reference import merge_state_dicts
from evomerge.merge.trimming import row_ranks
from evomerge.merge.workspace import Workspace
from evomerge.recipe import Recipe
from evomerge.runs.export_mergekit import mergekit_config, mergekit_yaml

LAYERS = 4
ARCHS = ["llama_gqa", "qwen2_tied"]
SEED, RANDOM_SEED = 11, 1234
GRID = 256.0
KINDS = {"self_attn": 0.3, "mlp": (0.5, 1.0), "default": 0.8}
DENS = {"mlp": 0.2, "default": (0.4, 0.7)}
EXACT = {
    "linear_per_layer_and_kinds": ("linear", {
        "a": {"weight": (0.2, 0.5, 0.7, 1.0)}, "b": {"weight": 0.3}, "c": {"weight": KINDS}}, {}),
    "task_arithmetic": ("task_arithmetic", {
        "a": {"weight": (0.2, 0.5, 0.7, 1.0)}, "b": {"weight": KINDS}}, {"lambda": 0.8}),
    "ties_per_layer_density_kinds": ("ties", {
        "a": {"weight": (0.2, 0.5, 0.7, 1.0), "density": 0.3},
        "b": {"weight": KINDS, "density": (0.5, 0.9)},
        "c": {"weight": 0.6, "density": DENS}}, {"lambda": 1.2}),
    "ties_rescale_no_normalize": ("ties", {
        "a": {"weight": 0.7, "density": 0.3}, "b": {"weight": 0.4, "density": 0.6}},
        {"normalize": False, "rescale": True}),
    "ties_global_density": ("ties", {
        "a": {"weight": 1.0}, "b": {"weight": 0.5}}, {"density": (0.2, 0.4, 0.6, 0.8)}),
    "breadcrumbs": ("breadcrumbs", {
        "a": {"weight": 0.7, "density": 0.8, "gamma": 0.05},
        "b": {"weight": KINDS, "density": (0.6, 0.9),
              "gamma": {"self_attn": 0.1, "default": 0.02}}}, {}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {
        "a": {"weight": (0.9, 0.4), "density": 0.7, "gamma": 0.03},
        "b": {"weight": 0.6, "density": DENS, "gamma": 0.1},
        "c": {"weight": KINDS, "density": 0.85}}, {"lambda": 0.9}),
    "breadcrumbs_ties_flags": ("breadcrumbs_ties", {
        "a": {"weight": 0.8, "density": 0.6}, "b": {"weight": 0.5, "density": (0.7, 0.9)}},
        {"normalize": True, "rescale": True}),
    "sce": ("sce", {"a": {}, "b": {}, "c": {}},
            {"select_topk": {"mlp": 0.3, "default": (0.5, 0.8)}}),
    "sce_all": ("sce", {"a": {}, "b": {}}, {}),
    "slerp_per_layer": ("slerp", {"a": {}}, {"t": (0.1, 0.5, 0.9, 0.3)}),
}
RANDOM = {
    "dare_linear": ("dare_linear", {"a": {"weight": 1.0, "density": (0.3, 0.6)}}, {}),
    "dare_ties": ("dare_ties", {"a": {"weight": 1.0, "density": {"mlp": 0.3, "default": 0.5}}},
                  {}),
    "della": ("della", {"a": {"weight": 1.0, "density": (0.4, 0.6), "epsilon": 0.2}}, {}),
    "della_linear": ("della_linear", {"a": {"weight": 1.0, "density": 0.5, "epsilon": 0.3}},
                     {"lambda": 1.0}),
}
CASES = {**EXACT, **RANDOM}
pytestmark = pytest.mark.parametrize("arch_models", ARCHS, indirect=True)


def recipe_for(case: str, sources: dict[str, str]) -> Recipe:
    method, models, params = CASES[case]
    base = None if method == "linear" else "base"
    return Recipe(method=method, sources=sources, base_model=base, models=models,
                  parameters=params, seed=SEED)


def run_mergekit(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(lazy_unpickle=False, quiet=True, copy_tokenizer=False,
                           random_seed=RANDOM_SEED)
    run_merge(MergeConfiguration.model_validate(cfg), str(out), options)
    return load_file(str(out / "model.safetensors"))


def on_grid(folders: dict[str, Path], root: Path) -> dict[str, str]:
    """Copies of the model folders with every weight rounded to a multiple of 1/GRID."""
    out = {}
    for name, folder in folders.items():
        dest = root / name
        shutil.copytree(folder, dest)
        weights = load_file(str(folder / "model.safetensors"))
        save_file({k: torch.round(v * GRID) / GRID for k, v in weights.items()},
                  str(dest / "model.safetensors"), metadata={"format": "pt"})
        out[name] = str(dest)
    return out


@pytest.fixture(scope="module")
def families(arch_models, tmp_path_factory) -> dict[str, dict[str, str]]:
    arch, folders = arch_models
    grid = on_grid(folders, tmp_path_factory.mktemp(f"grid_{arch}"))
    return {"raw": {n: str(p) for n, p in folders.items()}, "grid": grid}


def family_of(case: str) -> str:
    return "grid" if case in EXACT else "raw"


@pytest.fixture(scope="module")
def merged(families, tmp_path_factory) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Per case: mergekit's output, the pure merge and the Workspace's, each merged once."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mergekit")
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for fam, sources in families.items():
        sds = {n: load_file(f"{p}/model.safetensors") for n, p in sources.items()}
        ws = Workspace(sources, "base")
        for case in CASES:
            if family_of(case) != fam:
                continue
            recipe = recipe_for(case, sources)
            theirs = run_mergekit(mergekit_config(recipe, num_layers=LAYERS), root / case)
            live = {k: v.detach().clone() for k, v in ws.apply(recipe).state_dict().items()}
            pure = merge_state_dicts(recipe, sds, num_layers=LAYERS)
            out[case] = {"mergekit": theirs, "pure": pure, "live": live, "inputs": sds}
    return out


def test_grid_family_ties_the_trim_threshold(merged):
    """The grid makes ties: in most trimmed tensors |tau| ties the threshold, partly kept."""
    sds = merged["ties_rescale_no_normalize"]["inputs"]
    partial, big = 0, [n for n, t in sds["base"].items() if t.numel() >= 1024]
    for name in big:
        tau = (sds["a"][name] - sds["base"][name]).abs().reshape(-1)
        k = max(1, int(0.3 * tau.numel()))
        threshold = tau.sort(descending=True).values[k - 1]
        partial += int((tau > threshold).sum() < k < (tau >= threshold).sum())
    assert partial >= 0.8 * len(big)


@pytest.mark.parametrize("case", list(EXACT))
def test_pure_is_bitwise_and_workspace_close_to_mergekit(case, merged):
    out = merged[case]
    theirs, pure, live = out["mergekit"], out["pure"], out["live"]
    assert set(theirs) == set(pure)
    for name, tensor in theirs.items():
        assert torch.equal(pure[name], tensor), (name, (pure[name] - tensor).abs().max())
        torch.testing.assert_close(live[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    for name in set(live) - set(theirs):  # a tied lm_head: mergekit writes the embedding once
        assert torch.equal(live[name], live["model.embed_tokens.weight"]), name
    for source in out["inputs"].values():  # every setting had an effect
        assert any(not torch.equal(pure[n], source[n]) for n in pure)


def _groups(case: str, inputs: dict) -> dict[float, list[str]]:
    """Tensor names by the density the recipe gives them (model ``a``)."""
    models = CASES[case][1]
    groups: dict[float, list[str]] = {}
    for name, t in inputs["base"].items():
        if t.numel() >= 256:
            density = resolve(models["a"]["density"], name, num_layers=LAYERS)
            groups.setdefault(float(density), []).append(name)
    return groups


def _kept(merged_sd: dict, inputs: dict, names: list[str], where=None) -> tuple[float, int]:
    kept, total = 0, 0
    for n in names:
        changed = (merged_sd[n] - inputs["base"][n]) != 0
        sel = torch.ones_like(changed) if where is None else where[n]
        kept += int(changed[sel].sum())
        total += int(sel.sum())
    return kept / total, total


def _within(observed: float, p: float, n: int) -> bool:
    """Binomial: within 5 standard errors (plus DARE/DELLA's 1/4096 level resolution)."""
    return abs(observed - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1 / 4096


@pytest.mark.parametrize("case", list(RANDOM))
def test_random_methods_agree_statistically(case, merged):
    out = merged[case]
    inputs, pure, live = out["inputs"], out["pure"], out["live"]
    method, models, _ = CASES[case]
    for name, tensor in pure.items():  # the same seeded masks in both evomerge paths
        torch.testing.assert_close(live[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    top = {}
    for n, b in inputs["base"].items():
        tau = inputs["a"][n] - b
        m = tau.shape[1] if tau.dim() >= 2 else tau.numel()
        top[n] = (row_ranks(tau.abs()).reshape(tau.shape) >= m // 2)
    for density, names in _groups(case, inputs).items():
        for merged_sd in (out["mergekit"], pure):
            kept, n = _kept(merged_sd, inputs, names)
            assert _within(kept, density, n), (density, kept)
            for n_ in names:  # rescale restores each task vector's L1 norm
                tau = inputs["a"][n_] - inputs["base"][n_]
                delta = merged_sd[n_] - inputs["base"][n_]
                assert delta.abs().sum().item() == pytest.approx(tau.abs().sum().item(),
                                                                rel=1e-4), n_
            if method.startswith("della"):
                eps = models["a"]["epsilon"]
                high, n_hi = _kept(merged_sd, inputs, names, top)
                low, n_lo = _kept(merged_sd, inputs, names, {k: ~v for k, v in top.items()})
                assert _within(high, density + eps / 2, n_hi), (density, high)
                assert _within(low, density - eps / 2, n_lo), (density, low)


@pytest.mark.slow  # ~25 s a process on 2 busy cores: the full lane
def test_cli_on_the_exported_yaml(arch_models, families, merged, tmp_path):
    """``mergekit-yaml`` (the real CLI, own process) on the YAML evomerge's exporter writes."""
    case = "breadcrumbs_ties"
    recipe = recipe_for(case, families["grid"])
    config = tmp_path / "merge.yaml"
    config.write_text(mergekit_yaml(recipe, num_layers=LAYERS))
    cli = Path(sys.executable).with_name("mergekit-yaml")
    command = [str(cli) if cli.exists() else "mergekit-yaml", str(config), str(tmp_path / "out"),
               "--no-lazy-unpickle", "--quiet", "--random-seed", str(RANDOM_SEED)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    theirs = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(theirs) == set(merged[case]["pure"])
    for name, tensor in theirs.items():
        assert torch.equal(merged[case]["pure"][name], tensor), name
