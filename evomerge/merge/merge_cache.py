"""Per-task-vector caches that make a candidate's trim windows and random masks cheap.

- :class:`SortCache`: a task vector's magnitudes sorted (float32) and mergekit's own argsort
  order of its entries (descending for TIES, ascending for breadcrumbs; int32): 8 bytes per
  entry, only for the task vectors where a candidate's trim bound cuts a tie group (where
  mergekit keeps some tied entries, not all, and only its order says which); every other bound
  is found by selection (:func:`evomerge.merge.trimming.window_bounds`), with no cache; never
  built with ``load.tie_order: index``.
- :class:`SceVariance`: SCE's variance across the merged task vectors, sorted, per tensor.
- :class:`DellaRanks`: DELLA's row rank of every entry (int32), for every seed; beyond the
  budget ranked again for every candidate.

DARE needs no cache: its random levels (and DELLA's) are hashed from the entry's index inside
the fused kernels (:mod:`evomerge.merge.levels`). Each cache holds ``K x params`` entries (K task
vectors) at most, is built on first use, and only if it fits in the budget: ``cache_bytes`` if
given, else half the memory free on the device at that moment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from evomerge.merge import merge_methods as mm
from evomerge.merge import trimming


def free_bytes(device: torch.device) -> int:
    """Memory free on ``device`` now (CUDA: ``mem_get_info``; CPU: MemAvailable, or 1 GiB)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 30


def _budget(cache_bytes: int | None, device: torch.device) -> int:
    return cache_bytes if cache_bytes is not None else free_bytes(device) // 2


class SortCache:
    """Sorted magnitudes and mergekit's argsort order of stored task vectors ``deltas[name][row]``
    per trim kind, built per task vector on first use: the Workspace asks only for those where a
    trim bound cuts a tie group (its bounds come from selection otherwise). Kept while their
    total stays within the budget, else sorted again when asked."""

    def __init__(self, deltas: Mapping[str, Tensor], cache_bytes: int | None) -> None:
        self._deltas = deltas
        self._cache_bytes = cache_bytes
        self._budget: int | None = None
        self._sorted: dict[tuple[str, str, int], trimming.SortedMagnitudes] = {}
        self._asked: dict[str, bool] = {}  # kind -> every sort asked for was kept

    def cached(self, kind: str) -> bool | None:
        """Whether the sorts of ``kind`` asked for are kept (None: none asked for yet)."""
        return self._asked.get(kind)

    def get(self, kind: str, name: str, row: int) -> trimming.SortedMagnitudes:
        """Task vector ``row`` of tensor ``name``, sorted for trim ``kind``."""
        key = (kind, name, row)
        if key in self._sorted:
            return self._sorted[key]
        s = trimming.sorted_magnitudes(kind, self._deltas[name][row].abs())
        if self._budget is None:
            device = next(iter(self._deltas.values())).device
            self._budget = _budget(self._cache_bytes, device)
        fits = self.nbytes() + s.values.numel() * 8 <= self._budget
        if fits:
            self._sorted[key] = s
        self._asked[kind] = self._asked.get(kind, True) and fits
        return s

    def nbytes(self) -> int:
        return sum(s.values.numel() * 8 for s in self._sorted.values())


def _select(stack: Tensor, rows: Sequence[int]) -> Tensor:
    if list(rows) == list(range(stack.shape[0])):
        return stack
    return stack[torch.tensor(list(rows), dtype=torch.long, device=stack.device)]


class DellaRanks:
    """DELLA's ascending row rank of every entry of stored task vectors (int32), for every seed
    (the random levels are hashed in the kernel, :mod:`evomerge.merge.levels`); beyond the
    budget ranked again for every candidate."""

    def __init__(self, deltas: Mapping[str, Tensor], cache_bytes: int | None) -> None:
        self._deltas = deltas
        self._cache_bytes = cache_bytes
        self._fits: bool | None = None
        self._cached: dict[str, Tensor] = {}

    def get(self, name: str, rows: Sequence[int]) -> Tensor:
        """The ranks ``(len(rows), n)`` (int32) of tensor ``name``'s task vectors ``rows``."""
        if self._fits is None:
            need = sum(d.numel() * 4 for d in self._deltas.values())
            device = next(iter(self._deltas.values())).device
            self._fits = need <= _budget(self._cache_bytes, device)
            if self._fits:
                # Every tensor at once, one per thread (the sorts release the GIL).
                names = list(self._deltas)
                with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
                    ranked = pool.map(
                        lambda n: self._ranks(n, range(self._deltas[n].shape[0])), names)
                    self._cached = dict(zip(names, ranked, strict=True))
        if not self._fits:
            return self._ranks(name, rows)
        return _select(self._cached[name], rows)

    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self._cached.values())

    def _ranks(self, name: str, rows: Sequence[int]) -> Tensor:
        stack = self._deltas[name]
        ranks = torch.empty((len(rows), stack[0].numel()), dtype=torch.int32,
                            device=stack.device)
        for out, row in zip(ranks, rows, strict=True):
            out.copy_(trimming.row_ranks(stack[row].abs()))
        return ranks


class SceVariance:
    """SCE's variance across the merged task vectors, per tensor and set of rows, sorted, so a
    candidate's ``select_topk`` mask is a threshold (``torch.topk`` itself only where the
    threshold cuts a tie, to keep mergekit's choice)."""

    def __init__(self, deltas: Mapping[str, Tensor], cache_bytes: int | None) -> None:
        self._deltas = deltas
        self._cache_bytes = cache_bytes
        self._fits: bool | None = None
        self._cached: dict[tuple[str, tuple[int, ...]], tuple[Tensor, Tensor, Tensor]] = {}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for entry in self._cached.values()
                   for t in entry)

    def mask(self, name: str, tvs: Tensor, rows: Sequence[int], density: float) -> Tensor | None:
        """mergekit's selection mask for float32 task vectors ``tvs`` (rows ``rows`` of tensor
        ``name``), as :func:`evomerge.merge.merge_methods.sce_mask` gives it."""
        if density >= 1:
            return None
        if self._fits is None:
            need = sum(d[0].numel() * 8 for d in self._deltas.values())
            device = next(iter(self._deltas.values())).device
            self._fits = need <= _budget(self._cache_bytes, device)
        key = (name, tuple(rows))
        entry = self._cached.get(key)
        if entry is None:
            var = torch.var(tvs, dim=0, unbiased=False)
            entry = (var, torch.sort(var.reshape(-1), descending=True).values,
                     torch.count_nonzero(var))
            if self._fits:
                self._cached[key] = entry
        var, ordered, nonzero = entry
        k = mm.sce_count(var, density, nonzero) if density > 0 else 0
        if k == 0:
            return torch.zeros_like(var)
        threshold = ordered[k - 1]
        if k < ordered.numel() and ordered[k] == threshold:
            return mm.sce_mask(var, density)
        return (var >= threshold).to(var.dtype)


def rescale_factors(before: Sequence[float], after: Sequence[float],
                    enabled: bool) -> list[float]:
    """mergekit's L1 rescale ``before / after`` per model; 1 where either is ~0 or disabled."""
    eps = mm.RESCALE_EPS
    return [1.0 if not enabled or b < eps or a < eps else b / a
            for b, a in zip(before, after, strict=True)]
