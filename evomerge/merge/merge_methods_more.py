"""Reference kernels of mergekit 0.1.5's geometric and selective methods, one tensor at a time.

Same contract as :mod:`evomerge.merge.merge_methods`: ``kernel(base, tensors, **params)`` with
``tensors`` stacked ``(K, *shape)``, per-model parameters as K floats, arithmetic in float32, the
result in the input dtype. The math follows mergekit 0.1.5's ``merge_methods/`` (the operation
order too, so float32 results agree to rounding); specs in :mod:`evomerge.merge.methods_more`.

>>> import torch
>>> base, tensors = torch.zeros(3), torch.tensor([[0.001, 0.5, -0.002]])
>>> nearswap(base, tensors, t=0.001).tolist()  # entries within t of the base are swapped in
[0.0010000000474974513, 0.0010000000474974513, -0.0010000000474974513]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _need_base(base: Tensor | None, method: str) -> Tensor:
    if base is None:
        raise ValueError(f"{method} needs a base model tensor; set base_model in the recipe")
    return base


def _out(result: Tensor, like: Tensor) -> Tensor:
    return result.to(like.dtype)


# -- model_stock -----------------------------------------------------------------------------
def model_stock(base: Tensor | None, tensors: Tensor, *, filter_wise: bool = False) -> Tensor:
    """Model Stock (Jang et al. 2024): move from the base towards the models' average by
    ``t = K cos / (1 + (K - 1) cos)``, ``cos`` the mean pairwise cosine of the task vectors, per
    tensor (or per row with ``filter_wise``). Where ``1 + (K - 1) cos`` is ~0 the base is kept."""
    w0 = _need_base(base, "model_stock").float()
    k = tensors.shape[0]
    if k < 2:
        raise ValueError(f"model_stock needs at least two models besides the base, got {k}")
    ws = tensors.float()
    if not filter_wise:
        w0, ws = w0.reshape(-1), ws.reshape(k, -1)
    elif w0.dim() == 1:
        w0, ws = w0.unsqueeze(0), ws.unsqueeze(1)
    offsets = ws - w0
    norms = torch.norm(offsets, dim=-1)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    cos = torch.stack([
        ((offsets[i] * offsets[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6))
        .clamp(-1, 1) for i, j in pairs
    ]).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, k * cos / torch.where(singular, 1.0, denominator))
    average = ws.sum(dim=0) / k
    return _out((t * average + (1 - t) * w0).reshape(tensors.shape[1:]), tensors)


# -- spherical interpolations ------------------------------------------------------------------
def slerp_rows(t: float, v0: Tensor, v1: Tensor, *, dim: int = -1, flatten: bool = False,
               eps: float = 1e-8) -> Tensor:
    """Spherical interpolation from ``v0`` (t=0) to ``v1`` (t=1) of each vector along ``dim``
    (of the whole tensor with ``flatten``), linear where the two are colinear."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0).add_(torch.sin(t * theta) * v1).div_(torch.sin(theta))
    if bool(colinear.any()):  # the linear branch only where needed (one pass less)
        out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp(base: Tensor | None, tensors: Tensor, *, weight: Sequence[float],
            nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True) -> Tensor:
    """NuSLERP: slerp between the two models at ``t = w_1 / (w_0 + w_1)`` (0.5 if the weights
    sum to ~0), of their task vectors when there is a base; whole tensors (``nuslerp_flatten``),
    else per row, or per column with ``nuslerp_row_wise``."""
    if tensors.shape[0] != 2:
        raise ValueError(f"nuslerp merges exactly two models, got {tensors.shape[0]}")
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    dim = 0 if nuslerp_row_wise else -1
    v0, v1 = tensors[0].float(), tensors[1].float()
    if base is None:
        return _out(slerp_rows(t, v0, v1, dim=dim, flatten=nuslerp_flatten), tensors)
    b = base.float()
    out = b + slerp_rows(t, v0 - b, v1 - b, dim=dim, flatten=nuslerp_flatten)
    return _out(out, tensors)


def multislerp(base: Tensor | None, tensors: Tensor, *, weight: Sequence[float],
               normalize_weights: bool = True, eps: float = 1e-8) -> Tensor:
    """Multi-SLERP: barycentric interpolation on the hypersphere (of the task vectors when there
    is a base): map the unit vectors to the tangent space at their weighted mean direction,
    average there, map back, and scale to the weighted mean norm. One model: that model."""
    if tensors.shape[0] == 1:
        return tensors[0].clone()
    x = tensors.float()
    if base is not None:
        x = x - base.float()
    flat = x.reshape(x.shape[0], -1)
    w = torch.tensor(list(weight), dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        if sum(weight) == 0:  # mergekit divides anyway and writes NaN tensors
            raise ValueError(f"multislerp: the weights {list(weight)} sum to 0 with "
                             "normalize_weights: true; give a model a non-zero weight")
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if x.shape[0] != 2:
            raise ValueError(
                "multislerp: the weighted mean of the models' directions is zero (antipodal "
                f"models with balancing weights {list(weight)}); choose other weights")
        out = (x[0] * w[0] + x[1] * w[1]).reshape(x.shape[1:])
    else:
        mean = mean / mean_norm
        tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * w.view(-1, 1)).sum(0)
        tangent_norm = torch.norm(tangent) + eps
        out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
        out = (out * (norms.squeeze(-1) * w).sum()).reshape(x.shape[1:])
    if base is not None:
        out = out + base.float()
    return _out(out, tensors)


def karcher(base: Tensor | None, tensors: Tensor, *, max_iter: float = 10,
            tol: float = 1e-5) -> Tensor:
    """The Karcher (Riemannian) mean of the models' directions on the unit sphere, equal
    weights, at most ``max_iter`` gradient steps until the tangent norm is below ``tol``, scaled
    by the mean norm. ``base`` is not used (mergekit ignores it too)."""
    k = tensors.shape[0]
    if max_iter != int(max_iter):
        raise ValueError(f"karcher: max_iter must be a whole number, got {max_iter}")
    if k == 1:
        return tensors[0].clone()
    flat = tensors.float().reshape(k, -1)
    norms = torch.linalg.vector_norm(flat, dim=-1)
    units = torch.where(norms[:, None] == 0, 0.0, flat / norms[:, None])
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros_like(tensors[0])
    alphas = valid.float() / float(valid.sum())
    mean = (alphas[:, None] * units).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[int(valid.nonzero()[0])].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(int(max_iter)):
        dots = (units @ mean).clamp(-1.0, 1.0)
        theta = torch.arccos(dots)
        factor = torch.where(theta < tol, 0.0, alphas * theta / torch.sin(theta))
        tangent = (factor[:, None] * (units - dots[:, None] * mean)).sum(0)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = norms.sum() / k
    return _out((scale * mean).reshape(tensors.shape[1:]), tensors)


# -- selective methods ---------------------------------------------------------------------------
def nearswap(base: Tensor | None, tensors: Tensor, *, t: float) -> Tensor:
    """NearSwap: take the model's value where it lies within ``t`` of the base's, interpolate
    with weight ``t / |base - model|`` elsewhere."""
    a = _need_base(base, "nearswap").float()
    if tensors.shape[0] != 1:
        raise ValueError(f"nearswap merges one model into the base, got {tensors.shape[0]}")
    b = tensors[0].float()
    w = (t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return _out(w * b + (1 - w) * a, tensors)


QUANTILES = (0.25, 0.5, 0.75)


def _quartiles(scores: Tensor) -> list[Tensor]:
    """Quartiles as mergekit picks them: ``sorted[floor(q * (n - 1))]``, exact at any size
    (mergekit samples 1M entries of larger tensors at random; evomerge does not)."""
    flat = scores.reshape(-1)
    index = (torch.tensor(QUANTILES) * (flat.numel() - 1)).long()
    return [flat.kthvalue(int(i) + 1).values for i in index]


def arcee_fusion(base: Tensor | None, tensors: Tensor) -> Tensor:
    """Arcee Fusion: keep the model's change only where its importance (|change| times the KL
    divergence of the rows' softmaxes) is an outlier: at least median + 1.5 IQR."""
    b = _need_base(base, "arcee_fusion").float()
    if tensors.shape[0] != 1:
        raise ValueError(f"arcee_fusion merges one model into the base, got {tensors.shape[0]}")
    x = tensors[0].float()
    p, q = F.softmax(x, dim=-1) + 1e-8, F.softmax(b, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    importance = (x - b).abs() * kl
    q1, median, q3 = _quartiles(importance)
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return _out(b + (x - b) * mask, tensors)


def _ram_parts(base: Tensor, tensors: Tensor, epsilon: float):
    """Flat task vectors zeroed below ``epsilon``, contributor counts, unique/shared masks."""
    tv = (tensors.float() - base.float()).reshape(tensors.shape[0], -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return tv * nonzero, nonzero, counts, counts > 1, counts == 1


def ram(base: Tensor | None, tensors: Tensor, *, epsilon: float = 1e-5) -> Tensor:
    """Reinforced Agent Merging: an entry changed (|tau| > ``epsilon``) by one model takes that
    change whole; one changed by several takes the mean of their changes."""
    b = _need_base(base, "ram")
    tv, _, counts, shared_mask, unique = _ram_parts(b, tensors, epsilon)
    merged = (tv * unique + tv * shared_mask / counts.clamp(min=1)).sum(dim=0)
    return _out(b.float() + merged.reshape(b.shape), b)


def ramplus_tl(base: Tensor | None, tensors: Tensor, *, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> Tensor:
    """RAM+ (tensor-local): as :func:`ram`, with each model's unique changes amplified by
    ``1 + r * min(rho, alpha)``, ``rho`` its shared-to-unique entry ratio in this tensor."""
    b = _need_base(base, "ramplus_tl")
    tv, nonzero, counts, shared_mask, unique = _ram_parts(b, tensors, epsilon)
    rho = (nonzero & shared_mask).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=epsilon)
    scale = 1 + r * rho.clamp(min=0, max=alpha)
    merged = (tv * unique * scale.unsqueeze(-1) + tv * shared_mask / counts.clamp(min=1)).sum(0)
    return _out(b.float() + merged.reshape(b.shape), b)
