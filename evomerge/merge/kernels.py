"""Fused per-tensor merge kernels for the Workspace: one pass over memory per candidate.

Each kernel reads the base tensor and K stored task vectors once, computes in float32 and writes
the merged tensor straight into ``out`` (the live parameter, any float dtype). The candidate's
numbers (per model: weight, trim bounds or DARE cut-off, rescale factor; shared: lambda and the
flags) arrive packed in small float32 tensors, so a new candidate never recompiles:
``torch.compile`` builds one loop per kernel, K and dtype (seconds, once per process). Without a
working compiler the same functions run eagerly (correct, slower, with full-size temporaries).

The math is :func:`evomerge.merge.merge_methods.gta_merge`'s, written for fusion; the Workspace
tests check both against each other for every method.

>>> import torch
>>> out, base = torch.empty(3), torch.zeros(3)
>>> deltas = torch.tensor([[1.0, -2.0, 3.0], [1.0, 2.0, -1.0]])
>>> run(linear_kernel, out, base, deltas, torch.tensor([1.0, 0.5, 0.5]))
>>> out.tolist()
[1.0, 0.0, 1.0]
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from evomerge.merge import levels


def linear_kernel(out: Tensor, base: Tensor, deltas: Tensor, coef: Tensor) -> None:
    """``out = coef[0] * base + sum_k coef[k + 1] * deltas_k`` (task arithmetic, linear)."""
    acc = base.float() * coef[0]
    for k in range(deltas.shape[0]):
        acc = acc + deltas[k].float() * coef[k + 1]
    out.copy_(acc)


def trim_kernel(out: Tensor, base: Tensor, deltas: Tensor, per_model: Tensor,
                shared: Tensor) -> None:
    """Generalized task arithmetic keeping the entries with ``lo_k <= |tau_k| <= hi_k``.

    ``per_model`` rows: weight, lo, hi, rescale factor; ``shared``: see :func:`combine`. Where
    a tie group straddles a bound the Workspace then rewrites those entries with
    :func:`masked_kernel`."""
    rows = []
    for k in range(deltas.shape[0]):
        d = deltas[k].float()
        a = d.abs()
        keep = (a >= per_model[1, k]) & (a <= per_model[2, k])
        rows.append(torch.where(keep, d * per_model[3, k] * per_model[0, k], 0.0))
    out.copy_(combine(base, rows, per_model[0], shared))


def masked_kernel(out: Tensor, base: Tensor, deltas: Tensor, keep: Tensor, per_model: Tensor,
                  shared: Tensor) -> None:
    """:func:`trim_kernel` with explicit keep masks ``keep`` (K, n) (same ``per_model`` rows;
    for the few entries of cut tie groups)."""
    rows = [torch.where(keep[k], deltas[k].float() * per_model[3, k] * per_model[0, k], 0.0)
            for k in range(deltas.shape[0])]
    out.copy_(combine(base, rows, per_model[0], shared))


def _levels(n: int, keys: Tensor, k: int, like: Tensor) -> Tensor:
    """Task vector ``k``'s level of each of its ``n`` entries (:func:`levels.hash_levels`)."""
    index = torch.arange(n, dtype=torch.int64, device=like.device)
    return levels.hash_levels(index, keys[k, 0], keys[k, 1])


def _della_keep(deltas: Tensor, ranks: Tensor, keys: Tensor, tables: Tensor, k: int) -> Tensor:
    return ranks[k] >= tables[k][_levels(deltas.shape[1], keys, k, deltas)]


def della_kernel(out: Tensor, base: Tensor, deltas: Tensor, ranks: Tensor, keys: Tensor,
                 tables: Tensor, per_model: Tensor, shared: Tensor) -> None:
    """Generalized task arithmetic keeping the entries whose row rank reaches their level's
    least kept rank: ``ranks`` (K, n) int32 the ascending row ranks, ``keys`` (K, 2) int64 the
    level keys, ``tables`` (K, 4096) int32 the least kept rank per level
    (:func:`evomerge.merge.trimming.della_table`); ``per_model`` rows: weight, rescale factor;
    ``shared``: see :func:`combine`."""
    rows = []
    for k in range(deltas.shape[0]):
        keep = _della_keep(deltas, ranks, keys, tables, k)
        rows.append(torch.where(keep, deltas[k].float() * per_model[1, k] * per_model[0, k], 0.0))
    out.copy_(combine(base, rows, per_model[0], shared))


def della_l1_kernel(sums: Tensor, deltas: Tensor, ranks: Tensor, keys: Tensor,
                    tables: Tensor) -> None:
    """``sums`` (2, K): each task vector's L1 norm and that of the entries DELLA keeps."""
    total, kept = [], []
    for k in range(deltas.shape[0]):
        a = deltas[k].float().abs()
        total.append(a.sum())
        kept.append(torch.where(_della_keep(deltas, ranks, keys, tables, k), a, 0.0).sum())
    sums.copy_(torch.stack([torch.stack(total), torch.stack(kept)]))


def dare_kernel(out: Tensor, base: Tensor, deltas: Tensor, keys: Tensor, per_model: Tensor,
                shared: Tensor) -> None:
    """Generalized task arithmetic keeping the entries whose DARE level is below a cut-off.

    ``keys`` (K, 2) int64: each task vector's level key (the levels are hashed on the fly,
    :mod:`evomerge.merge.levels`); ``per_model`` rows: weight, level cut-off, rescale factor;
    ``shared``: see :func:`combine`."""
    rows = []
    for k in range(deltas.shape[0]):
        keep = _levels(deltas.shape[1], keys, k, deltas) < per_model[1, k]
        rows.append(torch.where(keep, deltas[k].float() * per_model[2, k] * per_model[0, k], 0.0))
    out.copy_(combine(base, rows, per_model[0], shared))


def dare_l1_kernel(sums: Tensor, deltas: Tensor, keys: Tensor, cut: Tensor) -> None:
    """``sums`` (2, K): each task vector's L1 norm and that of the entries DARE keeps with
    level cut-offs ``cut`` (K,) (float32)."""
    total, kept = [], []
    for k in range(deltas.shape[0]):
        a = deltas[k].float().abs()
        keep = _levels(deltas.shape[1], keys, k, deltas) < cut[k]
        total.append(a.sum())
        kept.append(torch.where(keep, a, 0.0).sum())
    sums.copy_(torch.stack([torch.stack(total), torch.stack(kept)]))


def combine(base: Tensor, rows: list[Tensor], w: Tensor, shared: Tensor) -> Tensor:
    """``base + lambda * merged(rows)`` for weighted ``rows``; ``shared`` holds lambda,
    consensus (0/1), normalize (0/1) and the weights' sum (1 where it is ~0).

    With consensus only the entries whose sign agrees with the sign of the sum count (ties to
    +), and normalize divides by their weights; without consensus by the weights' sum."""
    total = rows[0]
    for r in rows[1:]:
        total = total + r
    majority = torch.where(total >= 0, 1.0, -1.0)
    agreed = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for k, r in enumerate(rows):
        agree = r * majority > 0
        agreed = agreed + torch.where(agree, r, 0.0)
        divisor = divisor + torch.where(agree, w[k], 0.0)
    consensus = shared[1] > 0
    mixed = torch.where(consensus, agreed, total)
    divisor = torch.where(consensus, torch.where(divisor == 0, 1.0, divisor), shared[3])
    mixed = torch.where(shared[2] > 0, mixed / divisor, mixed)
    return base.float() + shared[0] * mixed


_COMPILED: dict[Callable[..., None], Callable[..., None]] = {}
_EAGER: set[Callable[..., None]] = set()


COMPILE_MIN_NUMEL = 1 << 16
"""Tensors smaller than this run eagerly: compiling (seconds per kernel and process) does not
pay off on tiny models, where an eager merge takes milliseconds. 2**16 (was 2**18) so that the
k_proj/v_proj of a grouped-query model (SmolLM2-135M: 110,592 entries) are fused too: eager,
they took 60 % of an apply (issue 17; bench/real_model_merge.py)."""


def run(kernel: Callable[..., None], *args: Any) -> None:
    """Run ``kernel(*args)`` compiled (one loop, dynamic sizes), or eagerly for tensors under
    :data:`COMPILE_MIN_NUMEL` elements and once compiling has failed (with one warning). Give
    1-D ``out``/``base`` and 2-D ``(K, n)`` per-model tensors (a reduction kernel: its small
    ``out`` and the ``(K, n)`` task vectors)."""
    # Detached, views lose their ``_base``: else dynamo guards on the base's shape, and the
    # 576 x 576 q_proj then the 192 x 576 k_proj of SmolLM2 recompiled it (19 s cold, DARE).
    args = tuple(a.detach() for a in args)
    if kernel not in _EAGER and max(a.numel() for a in args[:2]) >= COMPILE_MIN_NUMEL:
        if kernel not in _COMPILED:
            _COMPILED[kernel] = torch.compile(kernel, dynamic=True)
        compiled = _COMPILED[kernel]
        try:
            compiled(*args)
            return
        except Exception as exc:  # no C++ compiler or Triton: the eager loop is the same math
            warnings.warn(f"torch.compile failed for {kernel.__name__} ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); running it eagerly", RuntimeWarning, stacklevel=2)
            _EAGER.add(kernel)
    kernel(*args)
