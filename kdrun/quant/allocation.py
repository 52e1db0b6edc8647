"""Bits per encoder layer: uniform, or Q-BERT's mixed precision by Hessian sensitivity."""

from __future__ import annotations

import math
from collections.abc import Sequence


def uniform_bits(num_layers: int, bits: int) -> tuple[int, ...]:
    return (bits,) * num_layers


def mixed_precision_bits(
    sensitivities: Sequence[float], low: int, high: int, target_average_bits: float | None = None
) -> tuple[int, ...]:
    """The most sensitive layers get ``high`` bits, as many as the target average width allows.

    ``target_average_bits`` (default: midway between the pair) caps the mean width
    over layers; every encoder layer holds the same number of weights, so this is
    also a cap on size. Ties go to the lower layer.
    """
    if not low < high:
        raise ValueError(f"mixed precision needs a pair low < high, got {low}/{high}")
    target = (low + high) / 2 if target_average_bits is None else target_average_bits
    if not low <= target <= high:
        raise ValueError(f"the target average width {target} must lie between {low} and {high}")
    count = len(sensitivities)
    high_layers = math.floor(count * (target - low) / (high - low) + 1e-9)
    ranked = sorted(range(count), key=lambda layer: (-sensitivities[layer], layer))
    chosen = set(ranked[:high_layers])
    return tuple(high if layer in chosen else low for layer in range(count))
