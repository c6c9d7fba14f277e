"""Pure per-tensor merge kernels on stacked tensors, with mergekit 0.1.5 semantics.

Every registered kernel has the signature ``kernel(base, tensors, **params) -> Tensor``: ``base``
is the base model's tensor (ignored by ``linear``), ``tensors`` stacks the merged models' tensors
on a new leading axis ``(K, *shape)``, and ``params`` are the method's parameters under mergekit's
names (``lambda`` is spelled ``lambda_``); per-model parameters are sequences of K floats.
Arithmetic runs in float32 and the result has the input dtype.

The task-arithmetic family (``task_arithmetic``, ``ties``, ``dare_*``, ``breadcrumbs*``,
``della*``) is mergekit's *generalized task arithmetic*, one kernel, :func:`gta`, configured by
each method's spec (:mod:`evomerge.merge.methods_spec`: its ``sparsifier`` and ``consensus``):
sparsify each task vector ``tau_k = theta_k - base``, scale it by its ``weight``, optionally keep
only entries that agree with the elected sign (``consensus``), sum, divide by the summed weights
if ``normalize``, multiply by ``lambda`` and add to the base. Trimming keeps exactly the entries
mergekit keeps, ties at the threshold included (:mod:`evomerge.merge.trimming`). ``rescale``
(default on for DARE and DELLA) rescales a sparsified task vector to its original L1 norm, as
mergekit does (not by ``1/density``). :func:`sce` weighs the models by their task vectors. The
named functions (:func:`ties`, ...) run a method by its spec, with its defaults.

>>> import torch
>>> base = torch.zeros(4)
>>> tensors = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
>>> ties(base, tensors, weight=[1.0], density=0.5).tolist()
[0.0, 0.0, 3.0, -4.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.merge import levels as lv
from evomerge.merge import trimming
from evomerge.merge.methods_spec import METHODS

RESCALE_EPS = 1e-7
# -- sparsification ------------------------------------------------------------------------
DARE_LEVELS = trimming.LEVELS
"""DARE and DELLA give each entry one random level in ``[0, DARE_LEVELS)``, a hash of its index
and the task vector's key (:mod:`evomerge.merge.levels`): DARE keeps the entries below
:func:`dare_cutoff` (density resolution 1/4096), DELLA compares them with a rank table."""
dare_cutoff = trimming.dare_cutoff


def random_mask(delta: Tensor, density: float, key: tuple[int, int] | None) -> Tensor | None:
    """DARE's keep mask: each entry kept with probability ``dare_cutoff(density) / 4096``
    (None: keep all); its levels from ``key`` (:mod:`evomerge.merge.levels`; None: a random
    key), the same on every device."""
    if density >= 1:
        return None
    levels = lv.dare_levels(delta.shape, key or lv.random_key(), delta.device)
    return levels < dare_cutoff(density)


def della_mask(delta: Tensor, density: float, epsilon: float,
               key: tuple[int, int] | None) -> Tensor | None:
    """DELLA's keep mask: row-ranked keep probabilities (:func:`trimming.della_table`), one
    random level per entry from ``key``, as DARE's are."""
    table = trimming.della_table(density, epsilon, trimming.row_length(delta.shape))
    if table is None:
        return None
    levels = lv.dare_levels(delta.shape, key or lv.random_key(), delta.device).reshape(-1)
    ranks = trimming.row_ranks(delta.abs())
    return (ranks >= table.to(ranks.device)[levels]).reshape(delta.shape)


def apply_mask(delta: Tensor, mask: Tensor | None, *, rescale: bool, inplace=False) -> Tensor:
    """Zero the dropped entries; with ``rescale``, restore the original L1 norm (mergekit)."""
    if mask is None:
        return delta
    before = delta.abs().sum() if rescale else None
    out = delta.mul_(mask) if inplace else delta * mask
    if before is None:
        return out
    after = out.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return out
    return out.mul_(before / after)


def sparsify(method: str, deltas: Tensor, **params) -> Tensor:
    """Sparsify each row of float32 ``deltas`` (K, ...) in place as merge ``method`` does
    (``params``: those of :func:`sparsify_as`)."""
    return sparsify_as(METHODS[method].sparsifier, deltas, **params)


def sparsify_as(
    kind: str | None,
    deltas: Tensor,
    *,
    density: Sequence[float],
    gamma: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
    rescale: bool = False,
    level_keys: Sequence[tuple[int, int] | None] | None = None,
) -> Tensor:
    """Sparsify each row of float32 ``deltas`` (K, ...) in place: ``kind`` is ``"random"``
    (DARE), ``"magnitude"`` (TIES), ``"outliers"`` (breadcrumbs), ``"della"`` (DELLA's
    magnitude-ranked random pruning) or None (keep all)."""
    for k in range(deltas.shape[0]):
        row = deltas[k]
        key = level_keys[k] if level_keys else None
        mask: Tensor | None
        if kind == "random":
            mask = random_mask(row, density[k], key)
        elif kind == "della":
            mask = della_mask(row, density[k], epsilon[k] if epsilon else 0.0, key)
        elif kind is not None:
            g = gamma[k] if gamma is not None else 0.0
            mask = trimming.trim_mask(row.abs(), method=kind, density=density[k], gamma=g)
        else:
            mask = None
        apply_mask(row, mask, rescale=rescale, inplace=True)
    return deltas


# -- combination -----------------------------------------------------------------------------
def combine(
    base: Tensor,
    deltas: Tensor,
    weight: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float = 1.0,
) -> Tensor:
    """``base + lambda * merged(weight_k * deltas_k)`` in float32 (``deltas`` is scaled in place).

    With ``consensus`` only entries whose sign agrees with the sign of the weighted sum count
    (TIES election; ties go to +), and ``normalize`` divides by the weights of those entries.
    """
    if deltas.shape[0] == 0:
        return base.float()
    w = torch.as_tensor(weight, dtype=torch.float32, device=deltas.device)
    w = w.reshape(-1, *([1] * (deltas.dim() - 1)))
    deltas.mul_(w)
    if consensus:
        # mergekit sums the entries whose sign equals the majority sign; the same sum, without
        # bool masks (slow on CPU): |delta| where signs agree, else 0, summed, times the sign.
        majority = (deltas.sum(dim=0) >= 0).float().mul_(2).sub_(1)
        agree = deltas.mul_(majority).relu_()
        mixed = agree.sum(dim=0).mul_(majority)
        divisor = (w * agree.sign_()).sum(dim=0)
        divisor.masked_fill_(divisor == 0, 1)
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor.masked_fill_(divisor.abs() < 1e-8, 1)
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return base.float() + mixed


def gta_merge(base: Tensor, deltas: Tensor, *, sparsifier: str | None, consensus: bool,
              **params) -> Tensor:
    """Generalized task arithmetic on float32 task vectors ``deltas`` (K, ...), in place.

    ``params``: ``weight``, ``density``, ``gamma``, ``epsilon`` (per model), ``lambda_``,
    ``normalize``, ``rescale``, and optionally ``level_keys`` (DARE, DELLA; see
    :func:`evomerge.merge.levels.level_key`).
    """
    if sparsifier is not None:
        sparsify_as(
            sparsifier, deltas, density=params["density"], gamma=params.get("gamma"),
            epsilon=params.get("epsilon"), rescale=params.get("rescale", False),
            level_keys=params.get("level_keys"),
        )
    return combine(
        base, deltas, params["weight"], consensus=consensus,
        normalize=params["normalize"], lambda_=params.get("lambda_", 1.0),
    )


# -- the kernels the built-in specs name -----------------------------------------------------
def gta(base: Tensor, tensors: Tensor, *, sparsifier: str | None, consensus: bool,
        weight: Sequence[float], normalize: bool, density: float | Sequence[float] = 1.0,
        gamma: float | Sequence[float] | None = None,
        epsilon: float | Sequence[float] | None = None, lambda_: float = 1.0,
        rescale: bool = False,
        level_keys: Sequence[tuple[int, int] | None] | None = None) -> Tensor:
    """Generalized task arithmetic: the kernel of the task-arithmetic family, whose spec passes
    its ``sparsifier`` and ``consensus``; the result has ``base``'s dtype."""
    if base is None:
        raise ValueError("this merge needs a base model tensor; set base_model in the recipe")
    params: dict = dict(weight=weight, lambda_=lambda_, normalize=normalize)
    if sparsifier is not None:
        params.update(density=_per_model(density, tensors), rescale=rescale)
        for key, value in (("gamma", gamma), ("epsilon", epsilon)):
            if value is not None:
                params[key] = _per_model(value, tensors)
        if level_keys is not None:
            params["level_keys"] = level_keys
    deltas = tensors.float() - base.float()
    return gta_merge(base, deltas, sparsifier=sparsifier, consensus=consensus,
                     **params).to(base.dtype)


def sce(base: Tensor, tensors: Tensor, *, select_topk: float = 1.0) -> Tensor:
    """SCE (mergekit ``sce``): keep the ``select_topk`` fraction of entries whose task vectors
    vary most across the models (of the entries that vary at all), elect signs as TIES does,
    and average the agreeing entries weighted by each task vector's mean square.

    Per-model weights are computed from the task vectors, not given. Ties in the variance are
    broken by ``torch.topk``, as in mergekit, which this follows operation for operation.
    """
    if base is None:
        raise ValueError("sce needs a base model tensor; set base_model in the recipe")
    tvs = tensors.float() - base.float()
    if select_topk >= 1:
        return sce_merge(base, tvs, None)
    return sce_merge(base, tvs, sce_mask(torch.var(tvs, dim=0, unbiased=False), select_topk))


def sce_merge(base: Tensor, tvs: Tensor, mask: Tensor | None) -> Tensor:
    """SCE on float32 task vectors ``tvs`` (K, ...) with a selection ``mask`` (None: all)."""
    if mask is not None:
        tvs = tvs * mask.unsqueeze(0)
    majority = (tvs.sum(dim=0) >= 0).float() * 2 - 1
    erase = tvs.sign() == majority
    squares = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(squares).item()
    weights = (torch.ones_like(squares) / squares.shape[0] if abs(total) < 1e-6
               else squares / total)
    weights = weights.reshape(-1, *([1] * (tvs.dim() - 1)))
    erased = weights * erase
    merged = (tvs * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)
    return (base.float() + merged).to(base.dtype)


def sce_count(var: Tensor, density: float, nonzero: Tensor | None = None) -> int:
    """How many entries SCE keeps: ``int(count_nonzero(var) * density)``, in mergekit's float32
    arithmetic (a 0-d count tensor times a float)."""
    count = torch.count_nonzero(var) if nonzero is None else nonzero
    return int(count * density)


def sce_mask(var: Tensor, density: float) -> Tensor | None:
    """1.0 on the ``sce_count`` entries of largest variance ``var`` (``torch.topk``, as
    mergekit); None: keep all."""
    if density >= 1:
        return None
    mask = torch.zeros_like(var)
    k = sce_count(var, density) if density > 0 else 0
    if k > 0:
        _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
        mask.view(-1)[indices] = 1
    return mask


def linear(base: Tensor | None, tensors: Tensor, *, weight: Sequence[float], normalize=True):
    """``sum_k w_k theta_k`` (divided by ``sum_k w_k`` if ``normalize``); ``base`` is unused."""
    w = torch.as_tensor(weight, dtype=torch.float32, device=tensors.device)
    result = torch.zeros(tensors.shape[1:], dtype=torch.float32, device=tensors.device)
    for k in range(tensors.shape[0]):
        result.addcmul_(tensors[k].float(), w[k])
    if normalize:
        total = w.sum()
        if total == 0:
            raise zero_total_error(weight)
        result.div_(total)
    return result.to(tensors.dtype)


def zero_total_error(weight: Sequence[float], *, tensor: str | None = None,
                     models: Sequence[str] | None = None) -> ValueError:
    """The error for a ``normalize: true`` linear merge whose weights sum to 0 (mergekit 0.1.5
    divides anyway and writes NaN tensors; the task-arithmetic family divides by 1 instead)."""
    names = models or [f"model {k}" for k in range(len(weight))]
    listed = ", ".join(f"{n}={float(w):g}" for n, w in zip(names, weight, strict=True))
    what = "all weights are 0" if not any(weight) else "the weights sum to 0"
    where = f" for tensor {tensor!r}" if tensor else ""
    return ValueError(
        f"linear: {what}{where} with normalize: true ({listed}), so the weighted mean is "
        "undefined; give some model a non-zero weight (search.space.bounds.weight.low above 0 "
        "ensures it) or set normalize: false"
    )


def task_arithmetic(base: Tensor, tensors: Tensor, **params) -> Tensor:
    """``base + lambda * sum_k w_k tau_k`` (divided by ``sum_k w_k`` if ``normalize``)."""
    return METHODS["task_arithmetic"](base, tensors, **params)


def ties(base: Tensor, tensors: Tensor, **params) -> Tensor:
    """TIES: keep each ``tau_k``'s top ``density`` by magnitude, elect signs, disjoint mean."""
    return METHODS["ties"](base, tensors, **params)


def dare_linear(base: Tensor, tensors: Tensor, **params) -> Tensor:
    """DARE: drop entries of each ``tau_k`` at random (keep ``density``), then task arithmetic."""
    return METHODS["dare_linear"](base, tensors, **params)


def dare_ties(base: Tensor, tensors: Tensor, **params) -> Tensor:
    """DARE drop, then TIES sign election."""
    return METHODS["dare_ties"](base, tensors, **params)


def breadcrumbs(base: Tensor, tensors: Tensor, **params) -> Tensor:
    """Model Breadcrumbs: drop the ``gamma`` largest and the smallest, keep ``density``."""
    return METHODS["breadcrumbs"](base, tensors, **params)


def breadcrumbs_ties(base: Tensor, tensors: Tensor, **params) -> Tensor:
    """Breadcrumbs sparsification, then TIES sign election."""
    return METHODS["breadcrumbs_ties"](base, tensors, **params)


def della(base: Tensor, tensors: Tensor, **params) -> Tensor:
    """DELLA: drop entries at random, small magnitudes more often (``density +/- epsilon``),
    rescale, then TIES sign election."""
    return METHODS["della"](base, tensors, **params)


def della_linear(base: Tensor, tensors: Tensor, **params) -> Tensor:
    """DELLA's pruning, then task arithmetic."""
    return METHODS["della_linear"](base, tensors, **params)


def slerp(base, tensors, *, t, dot_threshold=0.9995, eps=1e-8):
    """Spherical interpolation from ``base`` (t=0) to the single model (t=1), whole tensor.

    Falls back to linear interpolation when the two are nearly parallel, as mergekit does.
    """
    if base is None or tensors.shape[0] != 1:
        raise ValueError("slerp merges exactly one model into the base model")
    a, b = base.reshape(-1).float(), tensors[0].reshape(-1).float()
    tt = torch.tensor(float(t), device=a.device)
    if a.numel() == 0:
        return base.clone()
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        out = (1 - tt) * a + tt * b
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        out = torch.sin((1 - tt) * theta) / sin_theta * a + torch.sin(tt * theta) / sin_theta * b
    return out.reshape(base.shape).to(base.dtype)


def _per_model(value: float | Sequence[float], tensors: Tensor) -> Sequence[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * tensors.shape[0]
    return value
