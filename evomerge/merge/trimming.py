"""Which entries of a task vector each sparsifier keeps, with mergekit 0.1.5's exact tie-breaking.

mergekit ranks entries with ``torch.argsort`` (not stable): TIES keeps the first
``max(1, int(density * n))`` of the descending order of ``|tau|`` (flattened, float32), breadcrumbs
the window ``[n_bot, n_bot + int(density * n))`` of the ascending order, DELLA ranks each row
ascending. Among entries whose ``|tau|`` ties a threshold, which ones are kept is whatever that
argsort puts first; so evomerge ranks TIES and breadcrumbs with the very same call and keeps a
*rank window*: the kept set, ties included, is mergekit's, entry for entry (the reference merge
ranks every entry). The Workspace trims by magnitude bounds, ties included, in one fused pass; it
finds the bounds by selection (:func:`window_bounds`: exact order statistics from a sampled
bracket, ~55x faster than the sort on SmolLM2's task vectors) and only where a bound cuts a tie
group takes the argsort order (:class:`SortedMagnitudes`) to rewrite that group's entries
(:func:`partial_ties`). With ``load.tie_order: index`` it keeps, of such a group, mergekit's
count of entries, the ones with the lowest flat indices (:func:`index_ties`): no sort at all,
and a merge that differs from mergekit's only in which equal-magnitude entries are kept. DELLA
ranks every entry of a row (its keep probability is the rank's), so it sorts each row once
(:func:`row_ranks`: ties by position, a key sort).

TIES and breadcrumbs ranks are computed on the CPU in float32 (as mergekit does on the CPU),
whatever device the task vector is on, so a merge on a GPU keeps the same entries as
``mergekit-yaml`` on a CPU; DELLA's ranks (a total order) are the same on every device.

>>> import torch
>>> a = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])
>>> lo, hi = rank_window("magnitude", 5, density=0.4)
>>> keep = window_mask(magnitude_ranks(a), lo, hi)
>>> int(keep.sum()), bool(keep[1] | keep[3])     # two of the three tied 3.0s, nothing else
(2, False)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

LEVELS = 4096
"""Random levels per entry (DARE, DELLA): an entry draws a level in ``[0, LEVELS)``."""


def _argsort_cpu(values: Tensor, *, descending: bool, dim: int = -1) -> Tensor:
    work = values.detach().to("cpu")
    if work.dtype in (torch.float16, torch.bfloat16) or not work.is_floating_point():
        work = work.float()
    return torch.argsort(work, dim=dim, descending=descending)


def _inverse(order: Tensor) -> Tensor:
    """The rank of each entry from an argsort ``order`` along the last axis (int32)."""
    ranks = torch.empty(order.shape, dtype=torch.int32)
    steps = torch.arange(order.shape[-1], dtype=torch.int32).expand(order.shape)
    return ranks.scatter_(-1, order, steps)


def magnitude_ranks(abs_delta: Tensor) -> Tensor:
    """Each entry's position in mergekit's ``argsort(|tau|, descending=True)`` (TIES), flat,
    int32, on ``abs_delta``'s device."""
    flat = abs_delta.reshape(-1)
    return _inverse(_argsort_cpu(flat, descending=True)).to(flat.device)


def outlier_ranks(abs_delta: Tensor) -> Tensor:
    """Each entry's position in mergekit's ascending ``sort(|tau|).indices`` (breadcrumbs)."""
    flat = abs_delta.reshape(-1)
    order = torch.sort(flat.detach().to("cpu").float(), descending=False).indices
    return _inverse(order).to(flat.device)


def row_ranks(abs_delta: Tensor) -> Tensor:
    """DELLA's 0-based ascending rank of each entry within its row (mergekit ranks along
    dimension 1; a 1-D tensor is one row), flattened to ``abs_delta.numel()``, int32.

    Equal magnitudes are ranked by their position in the row. (mergekit's ``argsort`` is not
    stable, so it leaves their order unspecified; DELLA's masks are random, which no merge can
    tell apart.) A float32 row is ranked by sorting one int64 key per entry, its magnitude's
    bits above its position (all keys distinct, so every sort gives the same order), ~4.5x
    faster than ``argsort`` on CPU (numpy's vectorised sort); other dtypes by a stable
    ``argsort``, the same ranks."""
    rows = abs_delta if abs_delta.dim() >= 2 else abs_delta.reshape(1, -1)
    work = rows.detach().movedim(1, -1)
    if work.dtype in (torch.float16, torch.bfloat16):
        work = work.float()  # exact, order and ties kept
    shape = work.shape
    work = work.reshape(-1, shape[-1])
    m = shape[-1]
    steps = torch.arange(m, dtype=torch.int32, device=work.device).expand(work.shape)
    if work.dtype == torch.float32 and m < 1 << 31:
        keys = work.contiguous().view(torch.int32).to(torch.int64)
        keys.bitwise_left_shift_(32).bitwise_or_(torch.arange(m, device=work.device))
        if keys.device.type == "cpu":
            ordered = keys.numpy()
            ordered.sort(axis=-1)
            keys = torch.from_numpy(ordered)
        else:
            keys = torch.sort(keys, dim=-1).values
        order = keys.bitwise_and_(0xFFFFFFFF)
    else:
        order = torch.argsort(work, dim=-1, stable=True)
    ranks = torch.empty(work.shape, dtype=torch.int32, device=work.device).scatter_(-1, order,
                                                                                   steps)
    return ranks.reshape(shape).movedim(-1, 1).reshape(-1)


def row_length(shape: torch.Size | tuple[int, ...]) -> int:
    """The length of the rows DELLA ranks in (dimension 1; a 1-D tensor's length)."""
    return int(shape[1]) if len(shape) >= 2 else int(shape[0]) if shape else 1


def ranks_for(kind: str, abs_delta: Tensor) -> Tensor:
    """The ranks a sparsifier ``kind`` keeps a window of (``magnitude``, ``outliers``)."""
    if kind == "magnitude":
        return magnitude_ranks(abs_delta)
    if kind == "outliers":
        return outlier_ranks(abs_delta)
    raise ValueError(f"unknown trim method {kind!r}; use 'magnitude' or 'outliers'")


def rank_window(kind: str, n: int, *, density: float,
                gamma: float = 0.0) -> tuple[int, int] | None:
    """The kept ranks ``[lo, hi)`` of ``n`` entries (None: keep all; ``lo == hi``: none).

    ``magnitude`` (descending ranks) keeps ``max(1, int(density * n))`` entries; ``outliers``
    (ascending ranks) drops the ``int(gamma * n)`` largest (fewer if needed to keep the target)
    and keeps the next ``int(density * n)``, as mergekit's ``magnitude_outliers`` does.
    """
    if density >= 1:
        return None
    if kind == "magnitude":
        if density <= 0 or n == 0:
            return 0, 0
        return 0, max(1, int(density * n))
    if kind != "outliers":
        raise ValueError(f"unknown trim method {kind!r}; use 'magnitude' or 'outliers'")
    target = int(density * n)
    bottom = max(0, n - target - int(gamma * n))
    return bottom, bottom + target


def window_mask(ranks: Tensor, lo: int, hi: int) -> Tensor:
    """``lo <= ranks < hi``."""
    return (ranks >= lo) & (ranks < hi)


def trim_mask(abs_delta: Tensor, *, method: str, density: float,
              gamma: float = 0.0, tie_order: str = "mergekit") -> Tensor | None:
    """Entries kept by magnitude trimming (TIES) or breadcrumbs, shaped like ``abs_delta``;
    None: keep everything. ``tie_order``: ``mergekit`` keeps exactly mergekit's entries (ties
    included, by its argsort); ``index`` the same count, taking the lowest flat indices of a tie
    group a bound cuts (:func:`index_ties`, the Workspace's way: no sort)."""
    window = rank_window(method, abs_delta.numel(), density=density, gamma=gamma)
    if window is None:
        return None
    if tie_order == "mergekit":
        return window_mask(ranks_for(method, abs_delta), *window).reshape(abs_delta.shape)
    if tie_order != "index":
        raise ValueError(f"unknown tie order {tie_order!r}; use 'mergekit' or 'index'")
    flat = abs_delta.reshape(-1)
    if window[0] == window[1]:
        return torch.zeros_like(abs_delta, dtype=torch.bool)
    b = window_bounds(method, flat, window)
    keep = (flat.float() >= b.lo) & (flat.float() <= b.hi)
    for idx, kept in index_ties(flat, b, zeros=True):
        keep[idx] = kept
    return keep.reshape(abs_delta.shape)


# -- the Workspace's form: sorted magnitudes, argsort order, and the ties to fix up -----------
class SortedMagnitudes(NamedTuple):
    """One task vector's magnitudes in ascending order (float32, ``values``) and mergekit's
    argsort ``order`` for a trim kind (position -> flat index; int32), descending for TIES."""

    values: Tensor
    order: Tensor
    descending: bool


def sorted_magnitudes(kind: str, abs_delta: Tensor) -> SortedMagnitudes:
    """:class:`SortedMagnitudes` of ``abs_delta`` for ``kind`` (computed on the CPU, returned on
    ``abs_delta``'s device)."""
    device = abs_delta.device
    w = abs_delta.detach().reshape(-1).to("cpu").float()
    if kind == "magnitude":
        order = torch.argsort(w, descending=True)
        values = w[order].flip(0)
    elif kind == "outliers":
        values, order = torch.sort(w, descending=False)
    else:
        raise ValueError(f"unknown trim method {kind!r}; use 'magnitude' or 'outliers'")
    order = order.to(torch.int32).to(device)
    return SortedMagnitudes(values.to(device), order, kind == "magnitude")


def _ascending(s: SortedMagnitudes, lo: int, hi: int) -> tuple[int, int]:
    """The ascending-``values`` slice of the kind's positions ``[lo, hi)``."""
    n = s.values.numel()
    return (n - hi, n - lo) if s.descending else (lo, hi)


def window_values(s: SortedMagnitudes, window: tuple[int, int]) -> tuple[float, float]:
    """The least and largest magnitude inside a non-empty rank ``window``."""
    a, b = _ascending(s, *window)
    return float(s.values[a]), float(s.values[b - 1])


def window_l1(s: SortedMagnitudes, window: tuple[int, int]) -> float:
    """The L1 norm of the entries inside ``window`` (a slice sum of the sorted magnitudes)."""
    a, b = _ascending(s, *window)
    return float(s.values[a:b].sum())


def partial_ties(s: SortedMagnitudes, window: tuple[int, int]) -> list[tuple[Tensor, Tensor]]:
    """The tie groups that ``window`` cuts (at its ends), each as (flat indices of the group's
    entries, which of them mergekit keeps). Keeping ``lo <= |tau| <= hi`` (the window's
    values) is exact everywhere else."""
    lo, hi = window
    n = s.values.numel()
    out, seen = [], set()
    for position in {lo, hi - 1}:
        q = n - 1 - position if s.descending else position
        v = s.values[q:q + 1]
        first = int(torch.searchsorted(s.values, v, right=False))
        last = int(torch.searchsorted(s.values, v, right=True)) - 1
        start, stop = (n - 1 - last, n - 1 - first) if s.descending else (first, last)
        if (start, stop) in seen or (start >= lo and stop < hi):
            continue
        seen.add((start, stop))
        positions = torch.arange(start, stop + 1, device=s.order.device)
        out.append((s.order[start:stop + 1].long(), (positions >= lo) & (positions < hi)))
    return out


# -- exact bounds without a sort: order statistics by selection --------------------------------
SAMPLE = 1 << 14
"""Entries sampled to bracket an order statistic: the bracket holds ~3 % of a big tensor, whose
entries alone are then partitioned."""

_SAMPLE_INDEX: dict[int, np.ndarray] = {}


class Bounds(NamedTuple):
    """A rank window resolved to magnitudes: keep ``lo <= |tau| <= hi``. ``cut``: a tie group at
    a non-zero bound straddles the window, where only mergekit's argsort order says which of its
    entries are kept (:func:`partial_ties`); ties at 0 never matter (a kept 0 adds nothing).
    ``l1``: the L1 norms of the kept entries and of all (None unless asked for); the same for
    any choice of tied entries, as they are equal. ``groups``: each cut tie group (one at 0
    too) as ``(magnitude, entries kept, entries in the group)`` (:func:`index_ties`)."""

    lo: float
    hi: float
    cut: bool
    l1: tuple[float, float] | None
    groups: tuple[tuple[float, int, int], ...] = ()


def window_bounds(kind: str, abs_delta: Tensor, window: tuple[int, int], *,
                  l1: bool = False) -> Bounds:
    """:class:`Bounds` of a non-empty rank ``window`` of ``abs_delta`` for trim ``kind``, by
    selection (:func:`order_statistic`, ~2 passes over the entries) instead of a sort.

    >>> b = window_bounds("magnitude", torch.tensor([3.0, 1.0, 3.0, 2.0]), (0, 2), l1=True)
    >>> b.lo, b.cut, b.l1
    (3.0, False, (6.0, 9.0))
    """
    flat = _numpy_f32(abs_delta)
    n = flat.size
    if kind == "magnitude":  # the largest hi - lo: ascending positions [n - hi, n)
        a, b = n - window[1], n - window[0]
    elif kind == "outliers":
        a, b = window
    else:
        raise ValueError(f"unknown trim method {kind!r}; use 'magnitude' or 'outliers'")
    lo, below, through = order_statistic(flat, a)
    groups = [(lo, min(through, b) - a, through - below)]
    hi = math.inf
    if b < n:
        hi, below_hi, through_hi = order_statistic(flat, b - 1)
        if hi == lo:  # one tie group holds the whole window
            groups = [(lo, b - a, through - below)]
        else:
            groups.append((hi, b - below_hi, through_hi - below_hi))
    cuts = tuple(g for g in groups if g[1] < g[2])
    kept = None
    if l1:
        where = flat >= lo if b == n else (flat >= lo) & (flat <= hi)
        dropped = sum(v * (size - keep) for v, keep, size in cuts)
        kept = (float(np.sum(flat, where=where, dtype=np.float64)) - dropped,
                float(np.sum(flat, dtype=np.float64)))
    return Bounds(lo, hi, any(v > 0 for v, _, _ in cuts), kept, cuts)


def index_ties(abs_delta: Tensor, bounds: Bounds, *,
               zeros: bool = False) -> list[tuple[Tensor, Tensor]]:
    """``load.tie_order: index``: the cut tie groups of ``bounds`` as :func:`partial_ties` gives
    them (flat indices of the group's entries, which are kept), keeping mergekit's count of each
    group's entries, the ones with the lowest flat indices. One pass per group, no sort. A
    group of zeros (kept or not, it adds nothing) only with ``zeros``.

    >>> a = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])
    >>> [(i.tolist(), k.tolist()) for i, k in index_ties(a, window_bounds("magnitude", a, (0, 2)))]
    [([0, 2, 4], [True, True, False])]
    """
    flat = _numpy_f32(abs_delta)
    out = []
    for value, keep, _ in bounds.groups:
        if value == 0 and not zeros:
            continue
        idx = torch.from_numpy(np.flatnonzero(flat == np.float32(value))).to(abs_delta.device)
        out.append((idx, torch.arange(idx.numel(), device=idx.device) < keep))
    return out


def order_statistic(flat: np.ndarray, q: int) -> tuple[float, int, int]:
    """The value ``v`` at ascending position ``q`` of ``flat`` (exact) with the counts of entries
    ``< v`` and ``<= v``. A sorted sample brackets ``v``; only the entries inside the bracket
    are partitioned (all of them if the bracket misses, which stays exact)."""
    cand, below = flat, 0
    n = flat.size
    if n > 4 * SAMPLE:
        sample = np.sort(flat[_sample_index(n)])
        centre, margin = q * SAMPLE / n, 4 * math.sqrt(SAMPLE / 4) + 8
        i, j = int(centre - margin), int(math.ceil(centre + margin))
        low = sample[i] if i > 0 else -np.inf
        high = sample[j] if j < SAMPLE else np.inf
        inside = flat[(flat >= low) & (flat <= high)]
        below = int(np.count_nonzero(flat < low)) if i > 0 else 0
        if below <= q < below + inside.size:
            cand = inside
        else:
            below = 0
    r = q - below
    v = np.partition(cand, r)[r]
    return float(v), below + int(np.count_nonzero(cand < v)), below + int(
        np.count_nonzero(cand <= v))


def _sample_index(n: int) -> np.ndarray:
    if n not in _SAMPLE_INDEX:
        _SAMPLE_INDEX[n] = np.random.default_rng(n).integers(0, n, SAMPLE)
    return _SAMPLE_INDEX[n]


def _numpy_f32(values: Tensor) -> np.ndarray:
    """``values`` flattened as a float32 numpy array on the CPU (a view when it already is)."""
    return values.detach().reshape(-1).to("cpu", torch.float32).numpy()


# -- DELLA: magnitude-ranked keep probabilities ------------------------------------------------
def check_della(density: float, epsilon: float) -> None:
    """mergekit's rule: ``density +/- epsilon`` inside (0, 1) (when ``0 < density < 1``)."""
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ValueError(
            f"della: density {density:g} +/- epsilon {epsilon:g} leaves (0, 1), which mergekit "
            "refuses; lower epsilon or keep density within (epsilon, 1 - epsilon) "
            "(search.space.bounds.density / .epsilon)")


def della_table(density: float, epsilon: float, row: int) -> Tensor | None:
    """For each random level ``L`` the least row rank kept (int32, ``(LEVELS,)``); None: keep all.

    An entry of ascending row rank ``r`` in a row of ``row`` entries is kept with probability
    ``p(r) = density - epsilon + 2 epsilon r / (row - 1)`` (mergekit's ``della_magprune``): it
    draws a level ``L`` and is kept if ``L < LEVELS * p(r)``, i.e. ``r >= table[L]``
    (probabilities resolved to 1/4096; ``row == 1``: ``p = density - epsilon``).
    """
    if density >= 1:
        return None
    check_della(density, epsilon)
    levels = torch.arange(LEVELS, dtype=torch.float64)
    if density <= 0:
        return torch.full((LEVELS,), row, dtype=torch.int32)
    if epsilon <= 0 or row <= 1:
        keep = levels < LEVELS * (density - max(epsilon, 0.0))
        return torch.where(keep, 0, row).to(torch.int32)
    x = (levels / LEVELS - (density - epsilon)) * (row - 1) / (2 * epsilon)
    least = torch.floor(x) + 1
    return least.clamp_(0, row).to(torch.int32)


def dare_cutoff(density: float) -> int:
    """DARE keeps entries with a level below ``floor(density * LEVELS)``, clipped."""
    return min(LEVELS, max(0, math.floor(density * LEVELS)))
