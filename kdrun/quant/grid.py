"""Symmetric uniform quantization on a b-bit grid, with a straight-through gradient.

The grid is signed and symmetric: ``2^(b-1) - 1`` positive levels, as many negative
ones and an exact zero (2 bits: {-s, 0, s}; 8 bits: -127s..127s). Dropping the most
negative integer keeps zero exact and the grid symmetric, which Q-BERT's
symmetric quantizer needs; a packed weight still takes b bits.

A range (scale ``s = max|x| / qmax``) is shared by one *group*: a block of contiguous
rows along ``axis`` (G blocks of equal size when G divides the rows, else sizes
differing by one). ``groups=1`` is one range per tensor, ``groups=-1`` one per row,
and an attention matrix whose rows are laid out head after head (``heads`` > 1) has
its groups aligned to heads: with at least as many groups as heads, each head gets
G // H or G // H + 1 groups of its own rows, so no group spans two heads (Q-BERT's 128
groups on 12 heads: 8 heads of 11 groups, 4 of 10); with fewer, each group is whole heads.
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
    """``groups`` resolved against a tensor's row count: ``-1``, or more groups than rows, is one group per row
    (so one setting, e.g. Q-BERT's 128, applies to matrices of every size)."""
    if groups == PER_ROW:
        return rows
    if groups < 1:
        raise ValueError(f"quantize.groups must be a positive group count or -1 (one per row), got {groups}")
    return min(groups, rows)


def group_of_rows(rows: int, groups: int, heads: int = 1) -> Tensor:
    """The group of each row: G contiguous blocks, equal when G divides the rows, else differing by one row;
    for rows laid out in ``heads`` equal blocks, blocks that never cross a head boundary (module docstring)."""
    count = group_count(rows, groups)
    row = torch.arange(rows)
    if heads <= 1 or rows % heads or count == rows:
        return row * count // rows
    head_rows = rows // heads
    head = row // head_rows
    if count < heads:  # each group is whole heads
        return head * count // heads
    per_head = torch.full((heads,), count // heads)
    per_head[: count % heads] += 1
    first_group = torch.cumsum(per_head, 0) - per_head
    return first_group[head] + (row % head_rows) * per_head[head] // head_rows


def group_slices(rows: int, groups: int, heads: int = 1) -> list[slice]:
    """The rows each group covers, in order."""
    starts = torch.searchsorted(group_of_rows(rows, groups, heads), torch.arange(group_count(rows, groups))).tolist()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [rows])]


def _row_scales(rows_first: Tensor, bits: int, groups: int, heads: int = 1) -> Tensor:
    """Each row's scale: its group's largest magnitude maps to the top grid level."""
    rows = rows_first.shape[0]
    index = group_of_rows(rows, groups, heads).to(rows_first.device)
    row_max = rows_first.reshape(rows, -1).abs().amax(dim=1)
    group_max = torch.zeros(group_count(rows, groups), dtype=row_max.dtype, device=row_max.device)
    group_max = group_max.scatter_reduce(0, index, row_max, reduce="amax")
    return group_max.clamp(min=torch.finfo(torch.float32).tiny)[index] / max_level(bits)


def group_scales(x: Tensor, bits: int, groups: int = 1, axis: int = 0, heads: int = 1) -> Tensor:
    """One scale per group, in group order."""
    moved = x.detach().movedim(axis, 0)
    scales = _row_scales(moved, bits, groups, heads)
    return torch.stack([scales[s][0] for s in group_slices(moved.shape[0], groups, heads)])


@torch.no_grad()
def fake_quantize(x: Tensor, bits: int, groups: int = 1, axis: int = 0, heads: int = 1) -> Tensor:
    """``x`` rounded to the nearest point of its group's grid (no gradient path)."""
    level = max_level(bits)
    if groups == 1:  # one range for the tensor (activations, embeddings): no regrouping needed
        scale = x.abs().amax().clamp(min=torch.finfo(torch.float32).tiny) / level
        return torch.clamp(torch.round(x / scale), -level, level) * scale
    moved = x.detach().movedim(axis, 0)
    rows = moved.reshape(moved.shape[0], -1)
    scale = _row_scales(moved, bits, groups, heads)[:, None]
    snapped = torch.clamp(torch.round(rows / scale), -level, level) * scale
    return snapped.reshape(moved.shape).movedim(0, axis)


def quantize_dequantize(x: Tensor, bits: int, groups: int = 1, axis: int = 0, heads: int = 1) -> Tensor:
    """Forward: the grid values; backward: the identity (straight-through estimator).

    With ranges set by the maximum nothing is clipped, so the STE needs no mask.
    """
    return x + (fake_quantize(x, bits, groups, axis, heads) - x).detach()
