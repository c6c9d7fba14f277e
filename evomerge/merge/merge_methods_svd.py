"""Data-free SVD merges of task matrices: TSV-M and Iso-C / Iso-CTS (2025), per tensor.

Both act on the task vectors ``tau_k = theta_k - base`` of each 2-D tensor (every weight matrix,
embeddings included: the papers' rule is the shape) and average the others (1-D norms and biases),
then return ``base + lambda * merged``.

- **TSV-M** (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
  Merging", CVPR 2025): keep each task's top ``r // K`` singular triplets (``r`` the smaller
  side), stack the K blocks, replace the stacked left and right singular vectors by their closest
  orthogonal matrices (polar factor: this removes the interference between tasks) and rebuild
  ``U_perp diag(S) V_perp^T``. With one task it is the task vector itself.
- **Iso-C** (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", ICML 2025): the sum of the task matrices with its spectrum made flat
  (every singular value replaced by their mean), so no direction of the common subspace dominates.
- **Iso-CTS**: the common subspace (top ``common_space_fraction`` of the sum's directions) plus,
  per task, the top directions of its task matrix outside it, orthogonalised as in TSV-M, with a
  flat spectrum (the mean of the kept singular values).

Read from the authors' method as FusionBench implements it; the division of dimensions follows
it, except that ``iso_cts`` never gives the tasks more dimensions than exist (FusionBench can, for
small matrices) and ``tsv_m`` averages a matrix whose smaller side is below K (nothing to keep).
SVDs run in float32 (float64 inputs stay float64).

>>> import torch
>>> base, tensors = torch.zeros(4, 3), torch.randn(2, 4, 3)
>>> torch.linalg.svdvals(iso_c(base, tensors)).diff().abs().max() < 1e-5  # flat spectrum
tensor(True)
"""

from __future__ import annotations

import torch
from torch import Tensor


def _task_vectors(base: Tensor | None, tensors: Tensor, method: str) -> tuple[Tensor, Tensor]:
    if base is None:
        raise ValueError(f"{method} needs a base model tensor; set base_model in the recipe")
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.to(dtype)
    return b, tensors.to(dtype) - b


def _polar(x: Tensor) -> Tensor:
    """The orthogonal factor of ``x``: the nearest matrix with orthonormal columns (or rows)."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def _finish(like: Tensor, b: Tensor, merged: Tensor, lambda_: float) -> Tensor:
    return (b + lambda_ * merged).to(like.dtype)


def tsv_m(base: Tensor | None, tensors: Tensor, *, lambda_: float = 1.0) -> Tensor:
    """Task Singular Vectors: Merge. ``base + lambda * TSV(tau_1..tau_K)``; see the module."""
    b, taus = _task_vectors(base, tensors, "tsv_m")
    k = taus.shape[0]
    rank = min(taus.shape[1:]) if taus.dim() == 3 else 0
    if rank // k == 0:
        return _finish(tensors, b, taus.mean(0), lambda_)
    keep = rank // k
    u, s, vh = torch.linalg.svd(taus, full_matrices=False)
    stacked_u = u[:, :, :keep].transpose(0, 1).reshape(taus.shape[1], k * keep)
    stacked_s = s[:, :keep].reshape(k * keep)
    stacked_vh = vh[:, :keep, :].reshape(k * keep, taus.shape[2])
    merged = (_polar(stacked_u) * stacked_s) @ _polar(stacked_vh)
    return _finish(tensors, b, merged, lambda_)


def iso_c(base: Tensor | None, tensors: Tensor, *, lambda_: float = 1.0) -> Tensor:
    """Isotropic merging in the common subspace: the summed task matrix, spectrum flattened."""
    b, taus = _task_vectors(base, tensors, "iso_c")
    if taus.dim() != 3:
        return _finish(tensors, b, taus.mean(0), lambda_)
    u, s, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    return _finish(tensors, b, (u * s.mean()) @ vh, lambda_)


def split_dims(rank: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(common, per task) dimensions of Iso-CTS: ``common + tasks * per_task == rank``, the
    common space about ``fraction`` of ``rank``, each task the same share of the rest."""
    common = int(rank * fraction)
    per_task = min(round((rank - common) / tasks), rank // tasks)
    return rank - per_task * tasks, per_task


def iso_cts(base: Tensor | None, tensors: Tensor, *, lambda_: float = 1.0,
            common_space_fraction: float = 0.8) -> Tensor:
    """Isotropic merging in the common and task-specific subspaces; see the module."""
    b, taus = _task_vectors(base, tensors, "iso_cts")
    if taus.dim() != 3:
        return _finish(tensors, b, taus.mean(0), lambda_)
    k, rows, cols = taus.shape
    common, per_task = split_dims(min(rows, cols), k, common_space_fraction)
    u, s, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    uc = u[:, :common]
    specific = taus - uc @ (uc.T @ taus)
    ut, st, vht = torch.linalg.svd(specific, full_matrices=False)
    stacked_u = torch.cat([ut[:, :, :per_task].transpose(0, 1).reshape(rows, k * per_task), uc],
                          dim=1)
    stacked_vh = torch.cat([vht[:, :per_task, :].reshape(k * per_task, cols), vh[:common]])
    level = torch.cat([st[:, :per_task].reshape(-1), s[:common]]).mean()
    merged = (_polar(stacked_u) * level) @ _polar(stacked_vh)
    return _finish(tensors, b, merged, lambda_)
