"""DARE and DELLA's random levels: a counter-based hash of (recipe seed, tensor, model, entry).

Every entry of a task vector draws a level in ``[0, LEVELS)``; DARE keeps it below a cut-off,
DELLA compares it with a rank table. The level is a pure function of the entry's flat index and
a 64-bit key hashed from (seed, tensor name, model name), so it needs no generator state and no
memory: a fused merge kernel computes it on the fly, on any device, and the reference merge the
same numbers eagerly (integer arithmetic only, bit-identical compiled or not, CPU or GPU).
Nothing is drawn up front, so the first apply costs what a later one does and there is no
level cache to fill (issue 17: one draw was 7.1 s of SmolLM2's first DARE apply, and every
apply with the cache off).

The hash (:func:`hash_levels`) is a multiply-add of the index and a 32-bit avalanche mix
(xor-shift-multiply, constants below 2**31 so that every product fits in int64), keyed by the
two words of the key; levels are its top 12 bits. Its bins are uniform, and two keys (or
neighbouring entries) give unrelated levels (tests/test_levels.py). Three multiplies: about
0.35 ns per entry inside a compiled CPU kernel (one thread), so a DARE pass costs ~1.1x a TIES
pass' memory traffic plus that. Indices are folded to 32 bits (levels would repeat beyond 2**32
entries in one tensor; a 7B model's largest has 0.5e9).

>>> import torch
>>> key = level_key(0, "w", "a")
>>> levels = dare_levels((2, 3), key)
>>> levels.shape, levels.dtype, bool(((levels >= 0) & (levels < LEVELS)).all())
(torch.Size([2, 3]), torch.int64, True)
>>> torch.equal(levels, dare_levels((2, 3), level_key(0, "w", "a")))
True
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.merge.trimming import LEVELS

__all__ = ["LEVELS", "dare_levels", "hash_levels", "keys_tensor", "level_key", "random_key"]

MASK32 = 0xFFFFFFFF
_MUL0 = 0x2545F491
_MUL1 = 0x7FEB352D
_MUL2 = 0x4C8BA6B1
LEVEL_SHIFT = 20  # 32 - log2(LEVELS)


def level_key(seed: int, tensor: str, model: str) -> tuple[int, int]:
    """The key of one task vector's levels: two 32-bit words from SHA-256 of (seed, tensor,
    model)."""
    digest = hashlib.sha256(f"{seed}\0{tensor}\0{model}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def random_key() -> tuple[int, int]:
    """A key from torch's global generator: mergekit's unseeded masks (no recipe seed)."""
    words = torch.randint(0, 1 << 31, (2,)).tolist()
    return int(words[0]), int(words[1])


def keys_tensor(keys: Sequence[tuple[int, int]], device: torch.device | str = "cpu") -> Tensor:
    """Keys as a ``(K, 2)`` int64 tensor, the form the fused kernels take."""
    return torch.tensor([list(k) for k in keys], dtype=torch.int64, device=device)


def hash_levels(index: Tensor, k0: Tensor | int, k1: Tensor | int) -> Tensor:
    """The level of each flat ``index`` (int64) under key words ``k0, k1`` (ints or 0-d int64
    tensors); torch operations only, so it fuses into a compiled kernel.

    ``x = index * C0 + k0`` (a bijection of the index mod 2**32), then a 32-bit avalanche mix
    (xor-shift-multiply, twice) with ``k1`` xored in between the two multiplies; every product
    stays below 2**63."""
    x = (((index ^ (index >> 32)) & MASK32) * _MUL0 + k0) & MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL1) & MASK32
    x = x ^ k1
    x = x ^ (x >> 16)
    x = (x * _MUL2) & MASK32
    return (x ^ (x >> 16)) >> LEVEL_SHIFT


def dare_levels(shape: Sequence[int], key: tuple[int, int],
                device: torch.device | str = "cpu") -> Tensor:
    """One task vector's levels (int64, ``shape``), its entries numbered in row-major order."""
    n = 1
    for size in shape:
        n *= int(size)
    index = torch.arange(n, dtype=torch.int64, device=device)
    return hash_levels(index, key[0], key[1]).reshape(tuple(shape))
