"""Per-task-vector caches that make a candidate's trim windows and random masks cheap.

- :class:`SortCache`: a task vector's magnitudes sorted (float32) and mergekit's own argsort
  order of its entries (descending for TIES, ascending for breadcrumbs; int32): 8 bytes per
  entry, only for the task vectors where a candidate's trim bound cuts a tie group (where
  mergekit keeps some tied entries, not all, and only its order says which); every other bound
  is found by selection (:func:`evomerge.merge.trimming.window_bounds`), with no cache; never
  built with ``load.tie_order: index``.
- :class:`DareLevels`: the DARE levels of each task vector for one recipe seed, and per level the
  L1 norm of the entries below it, so a rescale factor is a lookup. The levels of two task
  vectors share one float32 (``4096 * a + b``, exact): 2 bytes per entry, loaded at full speed
  (inductor's 16-bit loads measured ~2x slower than float32 on CPU). Beyond the budget they are
  drawn again for every candidate.
- :class:`SceVariance`: SCE's variance across the merged task vectors, sorted, per tensor.
- :class:`DellaCodes`: DELLA's row rank and random level of every entry for one seed, as one
  int32 ``rank * 4096 + level``; beyond the budget built again for every candidate.

Each holds ``K x params`` entries (K task vectors) at most; each is built on first use (the
DARE, DELLA and SCE ones all at once), and only if it fits in the budget: ``cache_bytes`` if
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


class DareLevels:
    """DARE levels and per-level cumulative L1 norms of stored task vectors, for one seed."""

    def __init__(self, deltas: Mapping[str, Tensor], models: Sequence[str],
                 cache_bytes: int | None) -> None:
        self._deltas = deltas
        self._models = list(models)  # the model name of each stored row
        self._cache_bytes = cache_bytes
        self._seed: int | None = None
        self._cached: dict[str, tuple[Tensor, Tensor]] | None = None

    def get(self, seed: int, name: str, rows: Sequence[int]) -> tuple[Tensor, Tensor]:
        """``(packed, cum)`` for ``rows`` of tensor ``name``: the levels ``(K, n)`` packed by
        :func:`pack_levels`, and ``cum (K, 4097)`` (float64, CPU), ``cum[k, c]``: the L1 norm of
        the entries with level < c."""
        if seed != self._seed:
            self._cached, self._seed = None, seed
            stacks = self._deltas.values()
            device = next(iter(self._deltas.values())).device
            budget = _budget(self._cache_bytes, device)
            need = sum((d.shape[0] + 1) // 2 * d[0].numel() * 4
                       + d.shape[0] * (mm.DARE_LEVELS + 1) * 8 for d in stacks)
            if need <= budget:
                # One tensor per thread (torch's ops release the GIL; each tensor has its own
                # generators, so the levels do not depend on the scheduling).
                names = list(self._deltas)
                with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
                    drawn = pool.map(
                        lambda n: self._draw(seed, n, range(self._deltas[n].shape[0])), names)
                    self._cached = dict(zip(names, drawn, strict=True))
        if self._cached is None:
            return self._draw(seed, name, rows)
        packed, cum = self._cached[name]
        if list(rows) == list(range(cum.shape[0])):
            return packed, cum
        index = torch.tensor(list(rows))
        levels = unpack_levels(packed, cum.shape[0])
        return pack_levels(levels[index.to(levels.device)]), cum[index]

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() + c.numel() * c.element_size()
                   for p, c in (self._cached or {}).values())

    def _draw(self, seed: int, name: str, rows: Sequence[int]) -> tuple[Tensor, Tensor]:
        gens = [mm.dare_generator(seed, name, self._models[row]) for row in rows]
        stack = self._deltas[name]
        packed, cum = draw_dare(stack.reshape(stack.shape[0], -1), rows, gens)
        return packed.to(stack.device), cum


STEP = 1 << 15
"""Entries per step of :func:`draw_dare`: a step's levels and float64 magnitudes stay in cache,
and no step is long enough (``at::internal::GRAIN_SIZE``) for torch to split it over threads,
whose wake-ups cost more than the step on a busy machine (measured: 2**16 was 20x slower)."""


def draw_dare(flat: Tensor, rows: Sequence[int],
              generators: Sequence[torch.Generator]) -> tuple[Tensor, Tensor]:
    """The DARE levels of task vectors ``flat[rows]`` (``(K', n)``; one CPU generator per row),
    packed by :func:`pack_levels`, and their per-level cumulative L1 norms ``(K, 4097)``
    (float64, CPU), in one pass over the task vectors, :data:`STEP` entries at a time.

    The same numbers as drawing each row whole (:func:`~evomerge.merge.merge_methods.dare_levels`:
    CPU ``randint`` takes one draw per entry, in order, so drawing in steps continues the same
    stream) and summing its magnitudes per level with ``torch.bincount`` in float64 (which adds
    them in index order, as ``index_add_`` does step after step). What it saves is memory
    traffic: no full-size int64 levels, float64 magnitudes, or stacked copies, which made the
    draw 45 s of a 90 s first DARE apply on SmolLM2-135M (a later apply: 2.5 s; issue 17)."""
    k, n = len(rows), flat.shape[1]
    packed = torch.empty(((k + 1) // 2, n), dtype=torch.float32)
    sums = torch.zeros((k, mm.DARE_LEVELS), dtype=torch.float64)
    step = max(1, min(n, STEP))
    levels = torch.empty((k, step), dtype=torch.int64)
    weights = torch.empty(step, dtype=torch.float64)
    if flat.device.type != "cpu":  # drawn and summed on the CPU, as mergekit's masks are
        flat, rows = flat[list(rows)].cpu(), range(k)
    for start in range(0, n, step):
        stop = min(n, start + step)
        m = stop - start
        for i, (row, gen) in enumerate(zip(rows, generators, strict=True)):
            chunk = flat[row, start:stop]
            torch.randint(0, mm.DARE_LEVELS, (m,), generator=gen, out=levels[i, :m])
            sums[i].index_add_(0, levels[i, :m], weights[:m].copy_(chunk).abs_())
        for j in range(packed.shape[0]):
            out = packed[j, start:stop].copy_(levels[2 * j, :m]).mul_(mm.DARE_LEVELS)
            if 2 * j + 1 < k:
                out.add_(levels[2 * j + 1, :m])
    cum = torch.stack([torch.cat([s.new_zeros(1), s.cumsum(0)]) for s in sums])
    return packed, cum


class DellaCodes:
    """DELLA's ``row_rank * 4096 + level`` per entry of stored task vectors, for one seed."""

    MAX_ROW = 1 << 19  # rank * 4096 + level stays below 2**31

    def __init__(self, deltas: Mapping[str, Tensor], models: Sequence[str],
                 cache_bytes: int | None) -> None:
        self._deltas = deltas
        self._models = list(models)
        self._cache_bytes = cache_bytes
        self._seed: int | None = None
        self._cached: dict[str, Tensor] | None = None

    def get(self, seed: int, name: str, rows: Sequence[int]) -> Tensor:
        """The codes ``(len(rows), n)`` (int32) of tensor ``name``'s task vectors ``rows``."""
        if seed != self._seed:
            self._cached, self._seed = None, seed
            need = sum(d.numel() * 4 for d in self._deltas.values())
            device = next(iter(self._deltas.values())).device
            if need <= _budget(self._cache_bytes, device):
                self._cached = {n: self._codes(seed, n, range(d.shape[0]))
                                for n, d in self._deltas.items()}
        if self._cached is None:
            return self._codes(seed, name, rows)
        return _select(self._cached[name], rows)

    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in (self._cached or {}).values())

    def _codes(self, seed: int, name: str, rows: Sequence[int]) -> Tensor:
        stack = self._deltas[name]
        if trimming.row_length(stack.shape[1:]) > self.MAX_ROW:
            raise ValueError(f"della: tensor {name!r} has rows of more than {self.MAX_ROW} "
                             "entries, which the Workspace cannot rank; merge it with the "
                             "reference merge (evomerge merge) instead")
        codes = torch.empty((len(rows), stack[0].numel()), dtype=torch.int32,
                            device=stack.device)
        for code, row in zip(codes, rows, strict=True):
            gen = mm.dare_generator(seed, name, self._models[row])
            torch.mul(trimming.row_ranks(stack[row].abs()), mm.DARE_LEVELS, out=code)
            code.add_(mm.dare_levels(stack[row].shape, gen).to(stack.device).reshape(-1))
        return codes


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


def pack_levels(levels: Tensor) -> Tensor:
    """Integer levels ``(K, n)`` as float32 ``(ceil(K / 2), n)``: row j holds
    ``4096 * levels[2j] + levels[2j + 1]`` (exact below 2**24; an odd K pads with 0)."""
    high = levels[0::2].float()
    low = levels[1::2].float()
    if low.shape[0] < high.shape[0]:
        low = torch.cat([low, low.new_zeros((1, *low.shape[1:]))])
    return high.mul_(mm.DARE_LEVELS).add_(low)


def unpack_levels(packed: Tensor, k: int) -> Tensor:
    """The inverse of :func:`pack_levels` for ``k`` task vectors, as float32."""
    high = torch.floor(packed / mm.DARE_LEVELS)
    low = packed - high * mm.DARE_LEVELS
    return torch.stack([high, low], dim=1).reshape(-1, *packed.shape[1:])[:k]


def rescale_factors(before: Sequence[float], after: Sequence[float],
                    enabled: bool) -> list[float]:
    """mergekit's L1 rescale ``before / after`` per model; 1 where either is ~0 or disabled."""
    eps = mm.RESCALE_EPS
    return [1.0 if not enabled or b < eps or a < eps else b / a
            for b, a in zip(before, after, strict=True)]
