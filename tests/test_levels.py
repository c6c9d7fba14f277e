"""DARE and DELLA's random levels (``evomerge.merge.levels``): a hash of the entry's index and a
key from (seed, tensor, model); uniform, unrelated across keys, the same eagerly and compiled,
and the Workspace's fused kernels keep exactly the entries the reference masks keep."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import kernels, trimming
from evomerge.merge import levels as lv
from evomerge.merge import merge_methods as mm
from evomerge.merge.merge_cache import DellaRanks


def test_levels_are_uniform_and_keys_are_unrelated():
    n = 1 << 20
    a = lv.dare_levels((n,), lv.level_key(0, "w", "a"))
    b = lv.dare_levels((n,), lv.level_key(0, "w", "b"))
    counts = torch.bincount(a, minlength=lv.LEVELS).double()
    assert a.min() >= 0 and a.max() < lv.LEVELS
    expected = n / lv.LEVELS
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert 3700 < chi2 < 4500  # 4095 degrees of freedom: mean 4095, sd ~90
    assert abs(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1]) < 0.01
    # neighbouring entries are not related either (a counter hash with a weak mix would be)
    assert abs(torch.corrcoef(torch.stack([a[:-1].double(), a[1:].double()]))[0, 1]) < 0.01
    # the same key on a permuted index range is not the same field shifted
    shifted = lv.dare_levels((1001,), lv.level_key(0, "w", "a"))[1:]
    assert (a[:1000] == shifted).float().mean() < 0.01


def test_level_keys_follow_seed_tensor_and_model():
    keys = {lv.level_key(s, t, m) for s in (0, 1) for t in ("w", "v") for m in ("a", "b")}
    assert len(keys) == 8
    assert lv.level_key(3, "w", "a") == lv.level_key(3, "w", "a")
    assert all(0 <= word < 1 << 32 for key in keys for word in key)


def test_levels_are_a_function_of_the_flat_index_only():
    key = lv.level_key(5, "w", "a")
    whole = lv.dare_levels((6, 7), key)
    assert torch.equal(whole.reshape(-1), lv.dare_levels((42,), key))
    index = torch.arange(10, 42, dtype=torch.int64)
    assert torch.equal(lv.hash_levels(index, *key), whole.reshape(-1)[10:])


def test_compiled_kernel_hashes_the_same_levels_as_the_reference():
    """The fused DARE kernel (compiled: above the size threshold) keeps exactly the entries of
    ``random_mask`` with the same key, and its L1 reduction is that mask's."""
    n = kernels.COMPILE_MIN_NUMEL + 123
    gen = torch.Generator().manual_seed(0)
    deltas = torch.randn(2, n, generator=gen)
    keys = [lv.level_key(1, "w", "a"), lv.level_key(1, "w", "b")]
    cut = [float(mm.dare_cutoff(0.3)), float(mm.dare_cutoff(0.6))]
    out = torch.empty(n)
    per_model = torch.tensor([[1.0, 1.0], cut, [1.0, 1.0]])
    shared = torch.tensor([1.0, 0.0, 0.0, 1.0])  # lambda 1, no consensus, no normalize
    kernels.run(kernels.dare_kernel, out, torch.zeros(n), deltas, lv.keys_tensor(keys),
                per_model, shared)
    want = sum(deltas[k] * mm.random_mask(deltas[k], d, keys[k])
               for k, d in enumerate((0.3, 0.6)))
    assert torch.allclose(out, want, atol=1e-6)
    sums = torch.empty(2, 2)
    kernels.run(kernels.dare_l1_kernel, sums, deltas, lv.keys_tensor(keys), torch.tensor(cut))
    kept = [float((deltas[k].abs() * mm.random_mask(deltas[k], d, keys[k])).sum())
            for k, d in enumerate((0.3, 0.6))]
    assert sums[1].tolist() == pytest.approx(kept, rel=1e-5)
    assert sums[0].tolist() == pytest.approx(deltas.abs().sum(1).tolist(), rel=1e-5)
    assert not kernels._EAGER


def test_unseeded_masks_differ_between_calls():
    delta = torch.ones(4096)
    assert not torch.equal(mm.random_mask(delta, 0.5, None), mm.random_mask(delta, 0.5, None))


@pytest.mark.parametrize("cache_bytes", [None, 0])
@pytest.mark.parametrize("shape", [(7,), (40, 9), (3, 5, 6)])
def test_della_ranks_cached_or_not_are_row_ranks(shape, cache_bytes):
    gen = torch.Generator().manual_seed(1)
    deltas = {"w": torch.randn((3, *shape), generator=gen)}
    deltas["w"].view(3, -1)[:, ::4] = 0  # ties
    ranks = DellaRanks(deltas, cache_bytes)
    for rows in ([0, 1, 2], [2, 0]):
        got = ranks.get("w", rows)
        for i, row in enumerate(rows):
            assert torch.equal(got[i], trimming.row_ranks(deltas["w"][row].abs()))
    assert (ranks.nbytes() > 0) is (cache_bytes is None)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_masks_of_different_keys_are_independent(density):
    """For many pairs of keys, the share of entries both masks keep is density**2, as for
    independent masks (a weak key schedule gives complementary or equal masks instead)."""
    n = 1 << 16
    cut = mm.dare_cutoff(density)
    p = cut / lv.LEVELS
    masks = [lv.dare_levels((n,), lv.level_key(s, "w", m)) < cut
             for s in range(4) for m in ("a", "b", "c")]
    sd = (p * p * (1 - p * p) / n) ** 0.5
    for i in range(len(masks)):
        assert abs(masks[i].float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
        for j in range(i):
            both = (masks[i] & masks[j]).float().mean().item()
            assert abs(both - p * p) < 6 * sd, (i, j, both)
