"""Counter-based uniforms for the noise layers: u[r, c] is a hash of (key, row r, column code c).

A training step draws one θ per (example, structure).  Reading uniforms from a generator costs about
2 ns each on the CPU, more than the sampling itself, and needs a (rows, structures) tensor; a counter-
based stream lets the fused kernel form each uniform in the lane that uses it.  Each draw takes a fresh
key of four 32-bit words from PyTorch's default generator (so ``torch.manual_seed`` and saved RNG
states reproduce it), and the row and column codes make the stream independent of how the work is
split: a network narrowed by ``shrink`` codes each structure by its original position and a
distributed shard its rows by their global index, so both draw exactly the θ of the full network.

The mixer is Wellons's "lowbias32" integer hash; ``_kernels/counter_uniforms.h`` is the same stream in
C++ and ``tests/test_uniforms.py`` checks the two bit for bit and the stream's uniformity and independence.

Examples:
    >>> import torch
    >>> from bmrs.nn.uniforms import counter_uniforms, draw_key
    >>> key = draw_key()
    >>> u = counter_uniforms(key, 0, 4, torch.arange(3), torch.float32)
    >>> u.shape, bool(((u > 0) & (u < 1)).all())
    (torch.Size([4, 3]), True)
    >>> torch.equal(counter_uniforms(key, 2, 2, torch.tensor([1]), torch.float32), u[2:, 1:2])
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _kernels
from .._kernels.constants import MIX_MULTIPLIERS

__all__ = ["draw_key", "counter_uniforms", "reference_uniforms"]

_MULTIPLIERS = MIX_MULTIPLIERS
_WORD = 0xFFFFFFFF


def draw_key() -> tuple[int, int, int, int]:
    """Four 32-bit words from PyTorch's default CPU generator: one per draw of θ."""
    return tuple(torch.randint(0, 1 << 32, (4,), dtype=torch.int64).tolist())


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2³² for x in [0, 2³²) held in int64, without overflowing int64."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _WORD


def _mix(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MULTIPLIERS[0])
    x = x ^ (x >> 15)
    x = _mul32(x, _MULTIPLIERS[1])
    return x ^ (x >> 16)


def reference_uniforms(key: tuple[int, int, int, int], rows: Tensor, codes: Tensor, dtype: torch.dtype) -> Tensor:
    """u of shape (len(rows), len(codes)) for int64 row indices and column codes, in PyTorch operations
    (any device).  float32: odd multiples of 2⁻²⁴; float64: odd multiples of 2⁻⁵²."""
    k0, k1, k2, k3 = key
    row = _mix(_mix(rows.long() ^ k0) ^ k1).unsqueeze(-1)
    column = _mix(_mix(codes.long().to(rows.device) ^ k2) ^ k3)
    high = _mix(row ^ column)
    if dtype == torch.float64:
        low = _mix(_mix((row + k2) & _WORD) ^ _mix((column + k0) & _WORD))
        return ((high << 20) | (low >> 12) | 1).to(torch.float64) * 2.0 ** -52
    return ((high >> 8) | 1).to(torch.float32).to(dtype) * 2.0 ** -24


def counter_uniforms(key: tuple[int, int, int, int], row_first: int, rows: int, codes: Tensor,
                     dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """u of shape (rows, len(codes)) for rows ``row_first …`` and the column ``codes`` (int64, each in
    [0, 2³²)): float64 for float64, else float32.  The fused kernels serve it on the CPU."""
    if row_first < 0 or rows < 0 or row_first + rows > 1 << 32:
        raise ValueError(f"counter_uniforms: rows {row_first}…{row_first + rows} leave [0, 2^32)")
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    device = torch.device(device) if device is not None else codes.device
    kernels = _kernels.usable_for() if device.type == "cpu" else None
    if kernels is not None:
        return kernels.counter_uniforms(list(key), row_first, rows, codes.cpu(), dtype == torch.float64)
    index = torch.arange(row_first, row_first + rows, device=device)
    return reference_uniforms(key, index, codes.to(device), dtype)
