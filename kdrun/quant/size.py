"""The real packed size of a quantized model: bits x weights, plus one fp32 scale per group."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from kdrun.quant.grid import group_count
from kdrun.quant.modules import QuantizationPlan, embedding_tables, quantized_linears

SCALE_BITS = 32
FULL_PRECISION_BITS = 32


def packed_size(model: nn.Module, plan: QuantizationPlan) -> dict[str, Any]:
    """Bytes when every quantized matrix is stored at its width with its group scales and the rest in fp32."""
    quantized: dict[int, int] = {}  # id(parameter) -> bits it takes
    for module, bits, axis, _heads in quantized_linears(model, plan):
        rows = module.weight.shape[axis]
        quantized[id(module.weight)] = module.weight.numel() * bits + group_count(rows, plan.groups) * SCALE_BITS
    if plan.embedding_bits:
        for table in embedding_tables(model):
            quantized[id(table.weight)] = table.weight.numel() * plan.embedding_bits + SCALE_BITS
    parameters = list({id(p): p for p in model.parameters()}.values())
    total_bits = sum(quantized.get(id(p), p.numel() * FULL_PRECISION_BITS) for p in parameters)
    full_bytes = sum(p.numel() for p in parameters) * FULL_PRECISION_BITS // 8
    packed_bytes = math.ceil(total_bits / 8)
    return {
        "packed_bytes": packed_bytes,
        "fp32_bytes": full_bytes,
        "compression": round(full_bytes / packed_bytes, 3),
        "average_weight_bits": round(sum(plan.layer_bits) / len(plan.layer_bits), 3),
    }
