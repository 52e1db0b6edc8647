"""Symmetric uniform quantization on a b-bit grid, with a straight-through gradient.

The grid is signed and symmetric: ``2^(b-1) - 1`` positive levels, as many negative
ones and an exact zero (2 bits: {-s, 0, s}; 8 bits: -127s..127s). Dropping the most
negative integer keeps zero exact and the grid symmetric, which Q-BERT's
symmetric quantizer needs; a packed weight still takes b bits.

A range (scale ``s = max|x| / qmax``) is shared by one *group*: a block of contiguous
rows along ``axis``. ``groups=1`` is one range per tensor, ``groups=-1`` one per row,
and G rows-groups of an attention matrix whose rows are laid out head after head are
aligned to heads whenever G is a multiple of the head count.
"""

from __future__ import annotations

import torch
from torch import Tensor

PER_ROW = -1


def max_level(bits: int) -> int:
    """The largest integer of the symmetric b-bit grid."""
    if bits < 2:
        raise ValueError(f"quantization needs at least 2 bits for a symmetric grid with zero, got {bits}")
    return 2 ** (bits - 1) - 1


def group_count(rows: int, groups: int) -> int:
    """``groups`` resolved against a tensor's row count (``-1`` = one group per row)."""
    count = rows if groups == PER_ROW else groups
    if count < 1 or rows % count:
        raise ValueError(
            f"cannot split {rows} rows into {groups} equal groups; use a divisor of {rows} "
            f"(e.g. 1, the head count, or {rows}) or -1 for one group per row"
        )
    return count


def group_slices(rows: int, groups: int) -> list[slice]:
    """The rows each group covers, in order."""
    count = group_count(rows, groups)
    size = rows // count
    return [slice(g * size, (g + 1) * size) for g in range(count)]


def _grouped(x: Tensor, groups: int, axis: int) -> tuple[Tensor, torch.Size]:
    moved = x.movedim(axis, 0)
    return moved.reshape(group_count(moved.shape[0], groups), -1), moved.shape


def group_scales(x: Tensor, bits: int, groups: int = 1, axis: int = 0) -> Tensor:
    """One scale per group: the group's largest magnitude maps to the top grid level."""
    grouped, _ = _grouped(x.detach(), groups, axis)
    return grouped.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / max_level(bits)


def fake_quantize(x: Tensor, bits: int, groups: int = 1, axis: int = 0) -> Tensor:
    """``x`` rounded to the nearest point of its group's grid (no gradient path)."""
    grouped, moved_shape = _grouped(x.detach(), groups, axis)
    level = max_level(bits)
    scale = grouped.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / level
    snapped = torch.clamp(torch.round(grouped / scale), -level, level) * scale
    return snapped.reshape(moved_shape).movedim(0, axis)


def quantize_dequantize(x: Tensor, bits: int, groups: int = 1, axis: int = 0) -> Tensor:
    """Forward: the grid values; backward: the identity (straight-through estimator).

    With ranges set by the maximum nothing is clipped, so the STE needs no mask.
    """
    return x + (fake_quantize(x, bits, groups, axis) - x).detach()
