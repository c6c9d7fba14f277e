"""TSV-M and Iso-C / Iso-CTS (:mod:`evomerge.merge.merge_methods_svd`): the papers' properties,
the merge of tiny models through the reference and the Workspace, the search space, and the
refused mergekit export (the hf and recipe exports work)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from evomerge.config import ModelsConfig, ParameterSpaceConfig
from evomerge.merge.merge_methods_svd import split_dims
from evomerge.merge.methods_spec import METHODS
from evomerge.merge.reference import merge_state_dicts
from evomerge.merge.workspace import Workspace
from evomerge.recipe import Recipe
from evomerge.runs.export import export_recipe
from evomerge.runs.export_mergekit import mergekit_config
from evomerge.search_spaces.parameter import ParameterSpace

SVD_METHODS = ["tsv_m", "iso_c", "iso_cts"]
LAYERS = 4
TOL = dict(rtol=1e-4, atol=1e-5)  # float32 SVDs and polar factors of up to 96 x 64 matrices


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def taus(k: int, rows: int = 48, cols: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, rows, cols, generator=gen(seed)) * 0.02


BASE = torch.randn(48, 32, generator=gen(99))


def merged_task(method: str, tau: torch.Tensor, **params) -> torch.Tensor:
    return (METHODS[method](BASE, BASE + tau, **params) - BASE) / params.get("lambda_", 1.0)


def orthogonal_tasks(k: int, rank: int, rows: int = 48, cols: int = 32) -> torch.Tensor:
    """K task matrices of rank ``rank`` whose column spaces and row spaces are mutually
    orthogonal (disjoint blocks of random orthogonal bases)."""
    q_left, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen(1)))
    q_right, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen(2)))
    s = torch.rand(k, rank, generator=gen(3)) + 0.5
    blocks = [(q_left[:, i * rank:(i + 1) * rank] * s[i]) @ q_right[:, i * rank:(i + 1) * rank].T
              for i in range(k)]
    return torch.stack(blocks) * 0.02


# -- the papers' properties, per tensor -------------------------------------------------------
def test_tsv_m_of_one_task_is_that_task_vector():
    tau = taus(1)
    out = METHODS["tsv_m"](BASE, BASE + tau, lambda_=0.7)
    torch.testing.assert_close(out, BASE + 0.7 * tau[0], **TOL)


def test_tsv_m_of_orthogonal_task_vectors_is_task_arithmetic():
    """Task singular vectors that do not interfere are kept as they are: TSV-M = TA."""
    tau = orthogonal_tasks(3, rank=10)  # 3 x 10 <= 32 dimensions, each task within its share
    ours = METHODS["tsv_m"](BASE, BASE + tau, lambda_=1.3)
    ta = METHODS["task_arithmetic"](BASE, BASE + tau, weight=[1.0] * 3, lambda_=1.3)
    torch.testing.assert_close(ours, ta, **TOL)
    # ... and only then: interfering task vectors are decorrelated, not summed
    other = taus(3)
    ta_other = METHODS["task_arithmetic"](BASE, BASE + other, weight=[1.0] * 3)
    assert (METHODS["tsv_m"](BASE, BASE + other) - ta_other).abs().max() > 1e-2


def test_tsv_m_keeps_each_tasks_top_singular_values():
    """The merged spectrum is the union of each task's top ``r // K`` singular values."""
    tau = taus(4)
    top = torch.linalg.svdvals(tau)[:, : 32 // 4].reshape(-1).sort(descending=True).values
    got = torch.linalg.svdvals(merged_task("tsv_m", tau))
    torch.testing.assert_close(got, top, **TOL)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
@pytest.mark.parametrize("k", [1, 3])
def test_iso_merged_task_matrix_has_a_flat_spectrum(method, k):
    s = torch.linalg.svdvals(merged_task(method, taus(k), lambda_=1.5))
    assert (s.max() - s.min()) / s.mean() < 1e-4
    if method == "iso_c":  # the flat level is the mean singular value of the summed task matrix
        torch.testing.assert_close(s.mean(), torch.linalg.svdvals(taus(k).sum(0)).mean(),
                                   **TOL)


def test_iso_cts_reduces_to_iso_c():
    """One task: common and task-specific subspaces together span it all, as Iso-C does; a
    common space of the whole rank (fraction 1) is Iso-C for any number of tasks."""
    one, three = taus(1), taus(3)
    torch.testing.assert_close(merged_task("iso_cts", one), merged_task("iso_c", one), **TOL)
    torch.testing.assert_close(merged_task("iso_cts", three, common_space_fraction=1.0),
                               merged_task("iso_c", three), **TOL)
    assert (merged_task("iso_cts", three) - merged_task("iso_c", three)).abs().max() > 1e-3


def test_iso_c_of_one_task_is_not_task_arithmetic():
    """The paper's point: even one task's spectrum is flattened (iso_c != TA there)."""
    tau = taus(1)
    assert (merged_task("iso_c", tau) - tau[0]).abs().max() > 1e-3


@settings(max_examples=200, deadline=None)
@given(rank=st.integers(1, 4096), tasks=st.integers(1, 20), fraction=st.floats(0.0, 1.0))
def test_iso_cts_dimensions_add_up(rank, tasks, fraction):
    common, per_task = split_dims(rank, tasks, fraction)
    assert common + tasks * per_task == rank and common >= 0 and per_task >= 0
    assert common >= int(rank * fraction) - tasks  # about the asked fraction


def test_iso_cts_dimensions_follow_the_paper():
    assert split_dims(768, 8, 0.8) == (616, 19)  # ViT-B/32, 8 tasks: 8 x 19 task dimensions
    assert split_dims(32, 3, 0.8) == (26, 2)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_vectors_are_averaged_and_dtype_kept(method):
    """1-D tensors (norms, biases): base + lambda * mean of the task vectors; any dtype in,
    the same dtype out; a second run gives the same bits."""
    base, tensors = torch.randn(16, generator=gen(5)), torch.randn(3, 16, generator=gen(6))
    out = METHODS[method](base, tensors, lambda_=0.5)
    torch.testing.assert_close(out, base + 0.5 * (tensors - base).mean(0))
    for dtype in (torch.bfloat16, torch.float16):
        low = METHODS[method](BASE.to(dtype), (BASE + taus(2)).to(dtype))
        assert low.dtype == dtype and low.shape == BASE.shape and torch.isfinite(low).all()
    again = METHODS[method](BASE, BASE + taus(3))
    assert torch.equal(again, METHODS[method](BASE, BASE + taus(3)))


def test_a_missing_base_is_refused():
    with pytest.raises(ValueError, match="tsv_m needs a base"):
        METHODS["tsv_m"](None, taus(2))


# -- through the merge engines, the search space and export -----------------------------------
@pytest.fixture(scope="module")
def sources(tiny_models) -> dict[str, str]:
    return {n: str(p) for n, p in tiny_models.items()}


@pytest.fixture(scope="module")
def state_dicts(sources):
    return {n: load_file(f"{p}/model.safetensors") for n, p in sources.items()}


def recipe(method: str, sources, **parameters) -> Recipe:
    return Recipe(method=method, sources=sources, base_model="base",
                  models={"a": {}, "b": {}, "c": {}}, parameters=parameters)


def test_reference_and_workspace_agree_on_tiny_models(sources, state_dicts):
    torch.set_num_threads(1)
    ws = Workspace(sources, "base")
    params = {"tsv_m": {"lambda": (0.5, 1.0)},
              "iso_c": {"lambda": {"mlp": 1.2, "default": 0.8}},
              "iso_cts": {"lambda": 1.0, "common_space_fraction": (0.6, 0.9)}}
    for method, p in params.items():
        r = recipe(method, sources, **p)
        pure = merge_state_dicts(r, state_dicts, num_layers=LAYERS)
        live = ws.apply(r).state_dict()
        for name, tensor in pure.items():
            torch.testing.assert_close(live[name], tensor, **TOL, msg=f"{method} {name}")
        q = "model.layers.1.self_attn.q_proj.weight"
        s = torch.linalg.svdvals(pure[q] - state_dicts["base"][q])
        if method != "tsv_m":
            assert (s.max() - s.min()) / s.mean() < 1e-3, method


@pytest.mark.parametrize("method", SVD_METHODS)
def test_search_space_over_the_method(method, sources, state_dicts):
    models = ModelsConfig(base={"path": sources["base"]},
                          experts={e: {"path": sources[e]} for e in ("a", "b")})
    cfg = ParameterSpaceConfig(name="parameter", method=method, layer_groups=2)
    space = ParameterSpace(cfg, models=models)
    dists = space.distributions()
    expected = {"lambda/0", "lambda/1"} | (
        {"common_space_fraction/0", "common_space_fraction/1"} if method == "iso_cts" else set())
    assert set(dists) == expected
    assert all(0 <= d.low < d.high for d in dists.values())
    point = {n: d.low + 0.3 * (d.high - d.low) for n, d in dists.items()}
    r = space.decode(point)
    assert space.encode(r) == pytest.approx(point) and Recipe.from_json(r.to_json()) == r
    merged = merge_state_dicts(r, state_dicts, num_layers=LAYERS)
    assert set(merged) == set(state_dicts["base"])


def test_bounds_outside_the_valid_range_are_refused():
    with pytest.raises(ValueError, match="1.5 is outside common_space_fraction.s valid range"):
        ParameterSpaceConfig(name="parameter", method="iso_cts",
                             bounds={"common_space_fraction": {"low": 0.5, "high": 1.5}})


@pytest.mark.parametrize("method", SVD_METHODS)
def test_mergekit_export_is_refused_naming_the_method(method, sources, tmp_path):
    r = recipe(method, sources)
    with pytest.raises(ValueError, match=rf"'{method}' has no mergekit equivalent.*--format hf"):
        mergekit_config(r, num_layers=LAYERS)
    out = tmp_path / "merge.yaml"
    with pytest.raises(ValueError, match=rf"'{method}'.*--format hf or --format recipe"):
        export_recipe(r, out, "mergekit")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    export_recipe(r, tmp_path / "recipe.yaml", "recipe")
    assert Recipe.from_yaml((tmp_path / "recipe.yaml").read_text()) == r


def test_hf_export_writes_the_merged_model(sources, state_dicts, tmp_path):
    r = recipe("iso_cts", sources, **{"lambda": 0.9})
    folder = export_recipe(r, tmp_path / "hf", "hf")
    written = load_file(str(folder / "model.safetensors"))
    for name, tensor in merge_state_dicts(r, state_dicts, num_layers=LAYERS).items():
        torch.testing.assert_close(written[name], tensor, **TOL, msg=name)
    assert "iso_cts" in (folder / "README.md").read_text()
