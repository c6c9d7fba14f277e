"""Magnitude ranks of a task vector and the bounds that trimming keeps (TIES, breadcrumbs).

The reference path sorts (:func:`sorted_kth`); the Workspace keeps a :func:`magnitude_table` per
task vector and reads any rank from it (:func:`table_kth`). :func:`trim_bounds` turns a density
(and breadcrumbs' ``gamma``) into the kept magnitude range, the same way for both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

Kth = Callable[[Tensor, int], Tensor]
"""``kth(magnitudes, r)``: the ``r``-th largest (0-based) of one task vector's flattened float32
magnitudes, as a 0-d tensor."""

def sorted_kth(abs_delta: Tensor) -> Kth:
    """A :data:`Kth` from a full sort (the reference; the Workspace uses a lookup table)."""
    values = torch.sort(abs_delta.reshape(-1).float(), descending=True).values
    return lambda _magnitudes, r: values[r]


class MagnitudeTable(NamedTuple):
    """Every ``step``-th magnitude in descending order, and how many magnitudes exceed each
    (not needed, so None, when ``step`` is 1)."""

    values: Tensor
    above: Tensor | None
    step: int


def magnitude_table(abs_delta: Tensor, size: int = 1024) -> MagnitudeTable:
    """Built once per task vector (about ``size`` entries; ``size >= n`` keeps them all);
    :func:`table_kth` then finds the magnitude of any rank from it."""
    ordered = torch.sort(abs_delta.reshape(-1), descending=True).values  # exact in its dtype
    step = max(1, -(-ordered.numel() // size))
    if step == 1:
        return MagnitudeTable(ordered, None, 1)
    ordered = ordered.float()
    values = ordered[::step].clone()
    above = ordered.numel() - torch.searchsorted(ordered.flip(0), values, right=True)
    return MagnitudeTable(values, above, step)


def table_kth(abs_flat: Tensor, table: MagnitudeTable, r: int) -> Tensor:
    """The ``r``-th largest of ``abs_flat`` (0-based), exactly, from its :func:`magnitude_table`.

    A rank on the table is a lookup; otherwise only the entries between the two neighbouring
    table values (about ``n / size``) are ranked.
    """
    j, offset = divmod(r, table.step)
    hi = table.values[j]
    if offset == 0:
        return hi
    last = j + 1 == table.values.numel()
    lo = torch.zeros((), device=hi.device) if last else table.values[j + 1]
    keep = abs_flat <= hi
    keep &= abs_flat >= lo
    between = abs_flat[keep]
    assert table.above is not None  # step > 1 here
    position = r - int(table.above[j])  # rank within `between`, descending
    return torch.kthvalue(between, between.numel() - position).values


def trim_bounds(
    method: str, n: int, *, density: float, gamma: float, kth: Callable[[int], Tensor | float]
) -> tuple[Tensor | float, Tensor | float] | None:
    """The kept magnitudes ``lo <= |tau| <= hi`` of magnitude trimming or breadcrumbs, from
    ``kth(r)``, the ``r``-th largest magnitude (0-based) of the ``n`` entries; None: keep all.

    ``magnitude`` keeps the ``max(1, int(density * n))`` largest; ``outliers`` drops the
    ``int(gamma * n)`` largest (fewer if needed to keep the target) and keeps the next
    ``int(density * n)``. Entries tied with a bound are kept; ``(0, -1)`` keeps nothing.
    """
    if density >= 1:
        return None
    if method == "magnitude":
        if density <= 0 or n == 0:
            return 0.0, -1.0
        return kth(max(1, int(density * n)) - 1), math.inf
    if method != "outliers":
        raise ValueError(f"unknown trim method {method!r}; use 'magnitude' or 'outliers'")
    target = int(density * n)
    if target <= 0:
        return 0.0, -1.0
    top = min(int(gamma * n), n - target)
    return kth(top + target - 1), kth(top) if top > 0 else math.inf


def trim_mask(
    abs_delta: Tensor, *, method: str, density: float, gamma: float, kth: Kth
) -> Tensor | None:
    """Entries kept by magnitude trimming (``magnitude``) or breadcrumbs (``outliers``), as
    :func:`trim_bounds` says; None means keep everything."""
    flat = abs_delta.reshape(-1)
    bounds = trim_bounds(method, flat.numel(), density=density, gamma=gamma,
                         kth=lambda r: kth(flat, r))
    if bounds is None:
        return None
    lo, hi = bounds
    return (abs_delta >= lo) & (abs_delta <= hi)
