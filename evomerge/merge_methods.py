"""Pure per-tensor merge kernels on stacked tensors, with mergekit 0.1.5 semantics.

Every registered kernel has the signature ``kernel(base, tensors, **params) -> Tensor``: ``base``
is the base model's tensor (ignored by ``linear``), ``tensors`` stacks the merged models' tensors
on a new leading axis ``(K, *shape)``, and ``params`` are the method's parameters under mergekit's
names (``lambda`` is spelled ``lambda_``); per-model parameters are sequences of K floats.
Arithmetic runs in float32 and the result has the input dtype.

The task-arithmetic family (``task_arithmetic``, ``ties``, ``dare_*``, ``breadcrumbs``) is
mergekit's *generalized task arithmetic*: sparsify each task vector ``tau_k = theta_k - base``,
scale it by its ``weight``, optionally keep only entries that agree with the elected sign
(``ties``, ``dare_ties``), sum, divide by the summed weights if ``normalize``, multiply by
``lambda`` and add to the base. ``rescale`` (default on for DARE) rescales a sparsified task
vector to its original L1 norm, as mergekit does (not by ``1/density``).

>>> import torch
>>> base = torch.zeros(4)
>>> tensors = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
>>> ties(base, tensors, weight=[1.0], density=0.5).tolist()
[0.0, 0.0, 3.0, -4.0]
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.trimming import Kth, sorted_kth, trim_mask

RESCALE_EPS = 1e-7
SPARSIFIER = {
    "task_arithmetic": None,
    "ties": "magnitude",
    "dare_linear": "random",
    "dare_ties": "random",
    "breadcrumbs": "outliers",
}
CONSENSUS = frozenset({"ties", "dare_ties"})


# -- sparsification ------------------------------------------------------------------------
DARE_LEVELS = 4096
"""DARE draws one random level in ``[0, DARE_LEVELS)`` per entry and keeps the entries below
:func:`dare_cutoff` (density resolution 1/4096; levels fit float16 exactly, which the Workspace
uses to cache them at 2 bytes per entry)."""


def dare_cutoff(density: float) -> int:
    """Entries with a DARE level below this are kept: ``floor(density * DARE_LEVELS)``, clipped."""
    return min(DARE_LEVELS, max(0, math.floor(density * DARE_LEVELS)))


def dare_levels(shape: Sequence[int], generator: torch.Generator | None) -> Tensor:
    """One task vector's DARE levels (int16, on the generator's device)."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, DARE_LEVELS, tuple(shape), generator=generator, device=device,
                         dtype=torch.int16)


def random_mask(delta: Tensor, density: float, generator: torch.Generator | None) -> Tensor | None:
    """DARE's keep mask: each entry kept with probability ``dare_cutoff(density) / 4096``
    (None: keep all). Levels are drawn on the generator's device (CPU by default), so the mask
    is the same on every device."""
    if density >= 1:
        return None
    return dare_levels(delta.shape, generator).to(delta.device) < dare_cutoff(density)


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


def dare_generator(seed: int, tensor: str, model: str, device: str | torch.device = "cpu"):
    """The generator for one task vector's DARE levels, seeded from (seed, tensor, model).

    Keep the default CPU device for masks that do not depend on where the merge runs."""
    digest = hashlib.sha256(f"{seed}\0{tensor}\0{model}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return gen


def sparsify(
    method: str,
    deltas: Tensor,
    *,
    density: Sequence[float],
    gamma: Sequence[float] | None = None,
    rescale: bool = False,
    kths: Sequence[Kth] | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
) -> Tensor:
    """Sparsify each row of float32 ``deltas`` (K, ...) in place as ``method`` does."""
    kind = SPARSIFIER[method]
    for k in range(deltas.shape[0]):
        row = deltas[k]
        if kind == "random":
            mask = random_mask(row, density[k], generators[k] if generators else None)
        elif kind is not None:
            magnitudes = row.abs()
            kth = kths[k] if kths is not None else sorted_kth(magnitudes)
            g = gamma[k] if gamma is not None else 0.0
            mask = trim_mask(magnitudes, method=kind, density=density[k], gamma=g, kth=kth)
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


def gta_merge(method: str, base: Tensor, deltas: Tensor, **params) -> Tensor:
    """Generalized task arithmetic on float32 task vectors ``deltas`` (K, ...), in place.

    ``params``: ``weight``, ``density``, ``gamma`` (per model), ``lambda_``, ``normalize``,
    ``rescale``, and optionally ``kths`` (per-model threshold lookups) and ``generators``.
    """
    if SPARSIFIER[method] is not None:
        sparsify(
            method, deltas, density=params["density"], gamma=params.get("gamma"),
            rescale=params.get("rescale", False), kths=params.get("kths"),
            generators=params.get("generators"),
        )
    return combine(
        base, deltas, params["weight"], consensus=method in CONSENSUS,
        normalize=params["normalize"], lambda_=params.get("lambda_", 1.0),
    )


def _gta(method: str, base: Tensor, tensors: Tensor, params: dict) -> Tensor:
    if base is None:
        raise ValueError(f"{method} needs a base model tensor; set base_model in the recipe")
    deltas = tensors.float() - base.float()
    return gta_merge(method, base, deltas, **params).to(base.dtype)


# -- the registered kernels ------------------------------------------------------------------
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


def task_arithmetic(base, tensors, *, weight, lambda_=1.0, normalize=False):
    """``base + lambda * sum_k w_k tau_k`` (divided by ``sum_k w_k`` if ``normalize``)."""
    return _gta("task_arithmetic", base, tensors, dict(
        weight=weight, lambda_=lambda_, normalize=normalize))


def ties(base, tensors, *, weight, density=1.0, lambda_=1.0, normalize=True, rescale=False):
    """TIES: keep each ``tau_k``'s top ``density`` by magnitude, elect signs, disjoint mean."""
    return _gta("ties", base, tensors, dict(
        weight=weight, density=_per_model(density, tensors), lambda_=lambda_,
        normalize=normalize, rescale=rescale))


def dare_linear(base, tensors, *, weight, density=1.0, lambda_=1.0, normalize=False,
                rescale=True, generators=None):
    """DARE: drop entries of each ``tau_k`` at random (keep ``density``), then task arithmetic."""
    return _gta("dare_linear", base, tensors, dict(
        weight=weight, density=_per_model(density, tensors), lambda_=lambda_,
        normalize=normalize, rescale=rescale, generators=generators))


def dare_ties(base, tensors, *, weight, density=1.0, lambda_=1.0, normalize=False,
              rescale=True, generators=None):
    """DARE drop, then TIES sign election."""
    return _gta("dare_ties", base, tensors, dict(
        weight=weight, density=_per_model(density, tensors), lambda_=lambda_,
        normalize=normalize, rescale=rescale, generators=generators))


def breadcrumbs(base, tensors, *, weight, density=1.0, gamma=0.01, lambda_=1.0,
                normalize=False, rescale=False):
    """Model Breadcrumbs: drop the ``gamma`` largest and the smallest, keep ``density``."""
    return _gta("breadcrumbs", base, tensors, dict(
        weight=weight, density=_per_model(density, tensors),
        gamma=_per_model(gamma, tensors), lambda_=lambda_, normalize=normalize,
        rescale=rescale))


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
