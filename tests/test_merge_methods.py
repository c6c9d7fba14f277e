"""Unit tests of the per-tensor merge kernels and the coefficient rules."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.merge import levels as lv
from evomerge.merge import merge_methods as mm
from evomerge.merge import trimming
from evomerge.merge.coefficients import layer_index, per_layer, resolve
from evomerge.merge.methods_spec import METHODS
from evomerge.registries import MERGE_METHODS


def test_every_registered_method_has_a_kernel_and_a_spec():
    assert MERGE_METHODS.names() == sorted(METHODS)
    for name in MERGE_METHODS.names():
        assert callable(MERGE_METHODS.get(name))


def test_linear_weighted_mean_and_sum():
    t = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert mm.linear(None, t, weight=[1.0, 3.0]).tolist() == [2.5, 5.0]
    assert mm.linear(None, t, weight=[1.0, 3.0], normalize=False).tolist() == [10.0, 20.0]
    with pytest.raises(ValueError, match="sum to 0"):
        mm.linear(None, t, weight=[1.0, -1.0])


def test_task_arithmetic_lambda_and_normalize():
    base = torch.tensor([1.0, 1.0])
    t = torch.tensor([[2.0, 1.0], [1.0, 3.0]])  # tau = [1, 0], [0, 2]
    out = mm.task_arithmetic(base, t, weight=[0.5, 1.0], lambda_=2.0)
    assert out.tolist() == [2.0, 5.0]
    out = mm.task_arithmetic(base, t, weight=[0.5, 1.5], normalize=True)
    assert out.tolist() == pytest.approx([1.25, 2.5])


def test_ties_elects_sign_and_takes_disjoint_mean():
    base = torch.zeros(4)
    t = torch.tensor([[1.0, -2.0, 3.0, 0.5], [2.0, 1.0, -1.0, 0.1]])
    out = mm.ties(base, t, weight=[1.0, 1.0])  # density 1: no trimming
    assert out.tolist() == pytest.approx([1.5, -2.0, 3.0, 0.3])
    summed = mm.ties(base, t, weight=[1.0, 1.0], normalize=False)
    assert summed.tolist() == pytest.approx([3.0, -2.0, 3.0, 0.6])


def test_ties_trims_each_task_vector_to_its_density():
    base = torch.zeros(4)
    t = torch.tensor([[4.0, -3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert mm.ties(base, t, weight=[1.0, 1.0], density=[0.5, 1.0]).tolist() == [4, -3, 0, 0]


def test_magnitude_trim_counts_follow_mergekit():
    a = torch.arange(1.0, 11.0)
    assert trimming.trim_mask(a, method="magnitude", density=1.0) is None
    assert not trimming.trim_mask(a, method="magnitude", density=0.0).any()
    assert trimming.trim_mask(a, method="magnitude", density=0.01).sum() == 1
    keep = trimming.trim_mask(a, method="magnitude", density=0.35)
    assert keep.tolist() == [False] * 7 + [True] * 3


def test_breadcrumbs_drops_largest_gamma_and_smallest():
    a = torch.arange(1.0, 11.0)
    keep = trimming.trim_mask(a, method="outliers", density=0.5, gamma=0.2)
    assert a[keep].tolist() == [4.0, 5.0, 6.0, 7.0, 8.0]
    # gamma shrinks so that density is still met
    keep = trimming.trim_mask(a, method="outliers", density=0.9, gamma=0.5)
    assert a[keep].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    base = torch.zeros(10)
    out = mm.breadcrumbs(base, a[None], weight=[1.0], density=0.5, gamma=0.2)
    assert out.tolist() == [0, 0, 0, 4, 5, 6, 7, 8, 0, 0]


def tied(n: int, seed: int) -> torch.Tensor:
    """Values on a coarse grid (1/8 steps in [-2.5, 2.5]): most magnitudes tie another."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-20, 21, (n,), generator=gen).float() * 0.125


@pytest.mark.parametrize("n", [10, 1000, 50_000])
def test_tied_trims_keep_exactly_mergekits_entries(n):
    """Where ``|tau|`` ties the threshold mergekit keeps exactly k entries, the ones its argsort
    puts first; evomerge kept every tied entry before. Bitwise equal, both sparsifiers."""
    from mergekit.sparsify import magnitude, magnitude_outliers

    delta = tied(n, n)
    for density in (0.1, 0.33, 0.5, 0.77):
        keep = trimming.trim_mask(delta.abs(), method="magnitude", density=density)
        assert int(keep.sum()) == max(1, int(density * n))
        assert torch.equal(delta * keep, magnitude(delta, density)), density
        for gamma in (0.0, 0.05, 0.3):
            keep = trimming.trim_mask(delta.abs(), method="outliers", density=density,
                                      gamma=gamma)
            assert int(keep.sum()) == int(density * n)
            assert torch.equal(delta * keep, magnitude_outliers(delta, density, gamma=gamma))


def test_ties_kernel_is_bitwise_mergekit_on_tied_task_vectors():
    """The whole TIES kernel (trim, sign election, disjoint mean, rescale) on grid values."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import RescaleNorm, magnitude

    base = tied(3000, 0) * 0.5
    tensors = torch.stack([base + tied(3000, s) for s in (1, 2, 3)])
    weight, density = [0.7, 0.4, 1.0], [0.3, 0.55, 0.8]
    for rescale in (False, True):
        ours = mm.ties(base, tensors, weight=weight, density=density, rescale=rescale)
        norm = RescaleNorm.l1 if rescale else None
        deltas = torch.stack([magnitude(t - base, d, rescale_norm=norm)
                              for t, d in zip(tensors, density, strict=True)])
        w = torch.tensor(weight)[:, None]
        deltas *= w
        mask = get_mask(deltas, method="sum")
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
        assert torch.equal(ours, base + (deltas * mask).sum(0) / divisor)


def test_rescale_restores_l1_norm():
    delta = torch.tensor([1.0, -2.0, 3.0, -4.0])
    mask = torch.tensor([False, True, False, True])
    out = mm.apply_mask(delta, mask, rescale=True)
    assert out.abs().sum().item() == pytest.approx(10.0)
    assert out.tolist() == pytest.approx([0.0, -10 / 3, 0.0, -20 / 3])
    assert mm.apply_mask(delta, mask, rescale=False).tolist() == [0.0, -2.0, 0.0, -4.0]


def test_dare_drop_rate_and_mean_are_preserved():
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    base = torch.zeros(n)
    tau = 1.0 + 0.5 * torch.randn(n, generator=gen)
    out = mm.dare_linear(base, tau[None], weight=[1.0], density=0.3,
                         level_keys=[lv.level_key(0, "w", "a")])
    kept = (out != 0).float().mean().item()
    assert kept == pytest.approx(0.3, abs=0.005)
    assert out.mean().item() == pytest.approx(tau.mean().item(), rel=0.01)
    assert out.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-4)
    plain = mm.dare_linear(base, tau[None], weight=[1.0], density=0.3, rescale=False,
                           level_keys=[lv.level_key(0, "w", "a")])
    assert torch.equal(plain[plain != 0], tau[plain != 0])


def test_dare_masks_are_seeded_by_seed_tensor_and_model():
    base, t = torch.zeros(1000), torch.ones(2, 1000)

    def run(seed, tensor):
        keys = [lv.level_key(seed, tensor, m) for m in ("a", "b")]
        return mm.dare_ties(base, t, weight=[1.0, 1.0], density=0.5, level_keys=keys)

    assert torch.equal(run(1, "w"), run(1, "w"))
    assert not torch.equal(run(1, "w"), run(2, "w"))
    assert not torch.equal(run(1, "w"), run(1, "v"))
    a = lv.dare_levels((100,), lv.level_key(1, "w", "a"))
    assert not torch.equal(a, lv.dare_levels((100,), lv.level_key(1, "w", "b")))


def test_della_keeps_larger_magnitudes_more_often():
    """Keep probability density - epsilon + 2 epsilon r / (m - 1) by row rank r (mergekit's
    della_magprune), drawn from seeded levels; rescale restores the L1 norm."""
    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(400, 500, generator=gen)
    base = torch.zeros_like(tau)
    keys = [lv.level_key(3, "w", "a")]
    out = mm.della_linear(base, tau[None], weight=[1.0], density=0.5, epsilon=0.3,
                          level_keys=keys)
    ranks = trimming.row_ranks(tau.abs()).reshape(tau.shape)
    kept = out != 0
    for lo, hi in ((0, 50), (225, 275), (450, 500)):
        band = (ranks >= lo) & (ranks < hi)
        expected = 0.2 + 0.6 * ((lo + hi - 1) / 2) / 499
        assert kept[band].float().mean().item() == pytest.approx(expected, abs=0.01)
    assert out.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-4)
    again = mm.della_linear(base, tau[None], weight=[1.0], density=0.5, epsilon=0.3,
                            level_keys=[lv.level_key(3, "w", "a")])
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="density 0.9 \\+/- epsilon 0.15.*lower epsilon"):
        mm.della(base, tau[None], weight=[1.0], density=0.9, epsilon=0.15, level_keys=keys)


def test_della_table_edges():
    assert trimming.della_table(1.0, 0.1, 10) is None
    assert (trimming.della_table(0.0, 0.1, 10) == 10).all()  # keeps nothing
    flat = trimming.della_table(0.25, 0.0, 10)  # no epsilon: DARE with density 0.25
    assert int((flat == 0).sum()) == 1024 and int((flat == 10).sum()) == 3072


def test_sce_follows_mergekit_and_one_model_is_itself():
    from mergekit.merge_methods.sce import sce_mask, sce_weight

    gen = torch.Generator().manual_seed(1)
    base = torch.randn(64, 32, generator=gen)
    tensors = base + torch.round(torch.randn(3, 64, 32, generator=gen) * 8) / 256  # ties
    for topk in (1.0, 0.6, 0.2):
        tvs = tensors - base
        if topk < 1:
            tvs = tvs * sce_mask(tvs, topk, torch.float32).unsqueeze(0)
        majority = (tvs.sum(0) >= 0).float() * 2 - 1
        w = sce_weight(tvs)[:, None, None] * (tvs.sign() == majority)
        expected = base + (tvs * w).sum(0) / w.sum(0).clamp(min=1e-6)
        assert torch.equal(mm.sce(base, tensors, select_topk=topk), expected), topk
    alone = mm.sce(base, tensors[:1])
    torch.testing.assert_close(alone, tensors[0], rtol=0, atol=1e-6)
    assert torch.equal(mm.sce(base, tensors, select_topk=0.0), base)


def test_slerp_endpoints_and_arc():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 1.0]])
    assert mm.slerp(a, b, t=0.0).tolist() == pytest.approx([1.0, 0.0])
    assert mm.slerp(a, b, t=1.0).tolist() == pytest.approx([0.0, 1.0])
    h = math.sqrt(0.5)
    assert mm.slerp(a, b, t=0.5).tolist() == pytest.approx([h, h])  # on the arc, not the chord
    parallel = mm.slerp(a, 3 * a[None], t=0.5)  # nearly parallel: linear fallback
    assert parallel.tolist() == pytest.approx([2.0, 0.0])
    with pytest.raises(ValueError, match="exactly one"):
        mm.slerp(a, torch.stack([a, a]), t=0.5)


def test_combine_without_models_is_base():
    base = torch.tensor([1.0, 2.0])
    assert torch.equal(mm.combine(base, torch.empty(0, 2), [], consensus=True,
                                  normalize=True), base)


def test_layer_index_across_architectures():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("lm_head.weight") is None


def test_resolve_rules():
    q = "model.layers.5.self_attn.q_proj.weight"
    up = "model.layers.5.mlp.up_proj.weight"
    norm = "model.layers.5.input_layernorm.weight"
    value = {"self_attn": 0.1, "mlp": (0.2, 0.3, 0.4), "default": 0.9}
    assert resolve(value, q, num_layers=8) == 0.1
    assert resolve(value, up, num_layers=8) == 0.3  # group 5 * 3 // 8 = 1
    assert resolve(value, norm, num_layers=8) == 0.9
    assert resolve(value, "model.norm.weight", num_layers=8) == 0.9
    assert resolve({"mlp": 0.2}, q, num_layers=8) is None  # falls through to the next scope
    assert resolve((0.1, 0.2), "lm_head.weight", num_layers=8) == 0.1
    assert resolve(True, q, num_layers=8) is True
    with pytest.raises(ValueError, match="at most 8"):
        resolve(tuple(range(9)), q, num_layers=8)


def test_per_layer_expands_groups_for_export():
    assert per_layer((1.0, 2.0, 3.0), 6) == (1.0, 1.0, 2.0, 2.0, 3.0, 3.0)
    assert per_layer({"mlp": (1.0, 2.0), "default": 0.5}, 4) == {
        "mlp": (1.0, 1.0, 2.0, 2.0), "default": 0.5}
