"""Per-task-vector caches that make a candidate's trim thresholds and DARE masks cheap.

- :class:`TrimTables`: every sorted magnitude of each task vector, in its dtype (a TIES or
  breadcrumbs threshold is then one lookup), or, beyond the memory budget, ~1024 quantiles
  refined exactly at each use (a pass over the task vector per threshold).
- :class:`DareLevels`: the DARE levels of each task vector for one recipe seed, and per level the
  L1 norm of the entries below it, so a rescale factor is a lookup. The levels of two task
  vectors share one float32 (``4096 * a + b``, exact): 2 bytes per entry, loaded at full speed
  (inductor's 16-bit loads measured ~2x slower than float32 on CPU). Beyond the budget they are
  drawn again for every candidate.

Both hold ``K x params`` entries (K task vectors) at most; both are built on first use, all at
once, and only if the whole cache fits in the budget: ``cache_bytes`` if given, else half the
memory free on the device at that moment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from evomerge.merge import merge_methods as mm
from evomerge.merge import trimming

QUANTILES = 1024


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


class TrimTables:
    """Magnitude tables of stored task vectors ``deltas[name][row]``, built on first use."""

    def __init__(self, deltas: Mapping[str, Tensor], cache_bytes: int | None) -> None:
        self._deltas = deltas
        self._cache_bytes = cache_bytes
        self._tables: dict[tuple[str, int], trimming.MagnitudeTable] = {}
        self.full: bool | None = None  # decided on first use

    def kth(self, name: str, row: int) -> Callable[[int], Tensor]:
        """``kth(r)``: the exact ``r``-th largest magnitude of task vector ``row`` of ``name``."""
        if self.full is None:
            self._build()
        table = self._tables[(name, row)]
        if table.step == 1:
            return lambda r: table.values[r]
        delta = self._deltas[name][row]
        return lambda r: trimming.table_kth(delta.reshape(-1).abs().float(), table, r)

    def _build(self) -> None:
        need = sum(d.numel() * d.element_size() for d in self._deltas.values())
        device = next(iter(self._deltas.values())).device
        self.full = need <= _budget(self._cache_bytes, device)
        for name, stack in self._deltas.items():
            for row in range(stack.shape[0]):
                size = stack[row].numel() if self.full else QUANTILES
                self._tables[(name, row)] = trimming.magnitude_table(stack[row].abs(), size)


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
                self._cached = {n: self._draw(seed, n, range(d.shape[0]))
                                for n, d in self._deltas.items()}
        if self._cached is None:
            return self._draw(seed, name, rows)
        packed, cum = self._cached[name]
        if list(rows) == list(range(cum.shape[0])):
            return packed, cum
        index = torch.tensor(list(rows))
        levels = unpack_levels(packed, cum.shape[0])
        return pack_levels(levels[index.to(levels.device)]), cum[index]

    def _draw(self, seed: int, name: str, rows: Sequence[int]) -> tuple[Tensor, Tensor]:
        stack = self._deltas[name]
        levels, cums = [], []
        for row in rows:
            gen = mm.dare_generator(seed, name, self._models[row])
            drawn = mm.dare_levels(stack[row].shape, gen).to(stack.device).reshape(-1)
            weights = stack[row].reshape(-1).abs().double()
            counts = torch.bincount(drawn.long(), weights=weights, minlength=mm.DARE_LEVELS)
            cums.append(torch.cat([counts.new_zeros(1), counts.cumsum(0)]).cpu())
            levels.append(drawn)
        return pack_levels(torch.stack(levels)), torch.stack(cums)


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
