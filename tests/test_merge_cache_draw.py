"""The DARE levels and DELLA codes the Workspace caches are the same numbers, bit for bit, as
drawing each task vector whole (``dare_levels``), summing with ``torch.bincount`` in float64 and
ranking with ``row_ranks``: the stepwise draw (issue 17) only moves less memory."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import merge_methods as mm
from evomerge.merge import trimming
from evomerge.merge.merge_cache import STEP, DareLevels, DellaCodes, draw_dare, pack_levels

SHAPES = [(7,), (40, 9), (STEP + 5,), (3, STEP // 2 + 1)]  # one step, several, a short last one


def task_vectors(k: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Magnitudes over many binades, zeros and exact ties, as real task vectors have."""
    gen = torch.Generator().manual_seed(seed)
    tv = torch.randn((k, *shape), generator=gen) * torch.rand((k, *shape), generator=gen) ** 12
    tv.view(k, -1)[:, ::5] = 0
    tv.view(k, -1)[:, 1::7] = 1e-3
    return tv


def whole_row_draw(stack: torch.Tensor, rows: list[int], seed: int, name: str,
                   models: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous way: each row's levels drawn at once and summed by ``bincount``."""
    levels, cums = [], []
    for row in rows:
        drawn = mm.dare_levels(stack[row].shape, mm.dare_generator(seed, name, models[row]))
        drawn = drawn.reshape(-1)
        weights = stack[row].reshape(-1).abs().double()
        counts = torch.bincount(drawn.long(), weights=weights, minlength=mm.DARE_LEVELS)
        cums.append(torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
        levels.append(drawn)
    return pack_levels(torch.stack(levels)), torch.stack(cums)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_stepwise_dare_draw_is_the_whole_row_draw_bit_for_bit(k, shape):
    stack = task_vectors(k, shape, seed=k)
    models = [f"m{i}" for i in range(k)]
    for rows in (list(range(k)), [k - 1], list(range(k))[::2]):
        gens = [mm.dare_generator(3, "w", models[r]) for r in rows]
        packed, cum = draw_dare(stack.reshape(k, -1), rows, gens)
        want_packed, want_cum = whole_row_draw(stack, rows, 3, "w", models)
        assert packed.dtype == torch.float32 and cum.dtype == torch.float64
        assert torch.equal(packed, want_packed)
        assert torch.equal(cum, want_cum)


@pytest.mark.parametrize("cache_bytes", [None, 0])
def test_dare_levels_cached_or_not_are_the_whole_row_draw(cache_bytes):
    deltas = {"a": task_vectors(3, (40, 9)), "b": task_vectors(3, (STEP + 5,), seed=1)}
    models = ["x", "y", "z"]
    levels = DareLevels(deltas, models, cache_bytes)
    for name, stack in deltas.items():
        for rows in ([0, 1, 2], [2, 0]):
            packed, cum = levels.get(7, name, rows)
            want_packed, want_cum = whole_row_draw(stack, rows, 7, name, models)
            assert torch.equal(packed, want_packed) and torch.equal(cum, want_cum)
    assert (levels.nbytes() > 0) is (cache_bytes is None)


@pytest.mark.parametrize("shape", [(7,), (40, 9), (3, 5, 6)])
def test_della_codes_are_rank_times_4096_plus_level(shape):
    deltas = {"w": task_vectors(3, shape)}
    codes = DellaCodes(deltas, ["x", "y", "z"], None).get(2, "w", [0, 1, 2])
    for row, model in enumerate(["x", "y", "z"]):
        level = mm.dare_levels(shape, mm.dare_generator(2, "w", model)).reshape(-1).int()
        rank = trimming.row_ranks(deltas["w"][row].abs())
        assert torch.equal(codes[row], rank * mm.DARE_LEVELS + level)
