"""A Q-BERT model's learnt grids in its ONNX graph: weights as integers, scales and DequantizeLinear nodes.

Q-BERT stores a quantized weight as integers ``q`` on a symmetric b-bit grid times one scale per group of
rows (or, for the attention output projections, of columns); the group scales, repeated for each row of
their group, are a per-axis scale vector, which ``DequantizeLinear`` (opset 13) carries exactly. So each
quantized weight initializer of the fp32 graph (the grid values, ``materialize``) is replaced by

    int8 q  --DequantizeLinear(scale per row or column, zero point 0)-->  the same fp32 grid values

computed by the same fp32 product ``q * scale`` kdrun's fake quantization computes, so the graph's weights
are the PyTorch model's, value for value. Embedding tables (one range each) get a scalar scale. The graph
becomes about four times smaller (int8 storage; below 8 bits the integers still take a byte each), and
ONNX Runtime may fuse DequantizeLinear and MatMul into its weight-only int8 kernel (MatMulNBits).

Activations are not quantized in the graph: Q-BERT's are dynamic (one symmetric range per tensor per
batch), which QDQ could only say with scales computed inside the graph, and ONNX Runtime runs integer
kernels only for constant activation scales (docs/export.md).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdrun.quant.grid import _row_scales, max_level
from kdrun.quant.modules import QuantizationPlan, embedding_tables, quantized_linears


def _digest(array: np.ndarray) -> str:
    """A key for an array's values (+ 0.0 turns the -0.0 that rounding leaves in torch's grid values into 0.0)."""
    return hashlib.sha256(np.ascontiguousarray(array + np.float32(0.0), dtype=np.float32).tobytes()).hexdigest()


def _grid(weight: torch.Tensor, bits: int, groups: int, axis: int, heads: int) -> tuple[np.ndarray, np.ndarray]:
    """(integers, scale per slice along ``axis``) of a latent weight on its grid, as kdrun's fake quantization
    computes them (``kdrun.quant.grid.fake_quantize``: the values are ``integers * scale`` in fp32)."""
    level = max_level(bits)
    with torch.no_grad():
        if groups == 1:  # one range for the tensor
            scale = (weight.abs().amax().clamp(min=torch.finfo(torch.float32).tiny) / level).reshape(1)
            integers = torch.clamp(torch.round(weight / scale), -level, level)
            return integers.to(torch.int8).numpy(), scale.numpy()
        moved = weight.detach().movedim(axis, 0)
        rows = moved.reshape(moved.shape[0], -1)
        scale = _row_scales(moved, bits, groups, heads)
        integers = torch.clamp(torch.round(rows / scale[:, None]), -level, level).reshape(moved.shape).movedim(0, axis)
        return integers.to(torch.int8).numpy(), scale.numpy()


def carry_grids(path: Path, latent: nn.Module, plan: QuantizationPlan) -> dict[str, int]:
    """Rewrite the fp32 graph at ``path`` (exported from ``latent`` after ``materialize``) so that its quantized
    weights are integers + per-axis scales + DequantizeLinear; ``latent``: the model with its fake-quantized
    layers and latent weights (the scales come from those, as in training). Returns how many weights of each
    kind were converted, and how many were not found in the graph (none, unless the exporter changed them)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    initializers = {_digest(numpy_helper.to_array(item)): item for item in graph.initializer if item.data_type == onnx.TensorProto.FLOAT}
    targets = [("matrices", m.weight, bits, plan.groups, axis, heads) for m, bits, axis, heads in quantized_linears(latent, plan)]
    if plan.embedding_bits:
        targets += [("embeddings", table.weight, plan.embedding_bits, 1, 0, 1) for table in embedding_tables(latent)]
    nodes, converted = [], {"matrices": 0, "embeddings": 0, "not_found": 0}
    for kind, weight, bits, groups, axis, heads in targets:
        integers, scale = _grid(weight, bits, groups, axis, heads)
        per_axis = groups != 1
        values = integers.astype(np.float32) * (np.expand_dims(scale, axis=1 - axis) if per_axis else scale.reshape(()))
        # A linear layer's weight is stored transposed (MatMul's B, [in, out]); an embedding table as it is.
        layouts = [(values, integers, axis)] if kind == "embeddings" else [(values.T, integers.T, 1 - axis)]
        found = [(initializers.pop(_digest(v), None), q, a) for v, q, a in layouts]
        found = [item for item in found if item[0] is not None]
        if not found:
            converted["not_found"] += 1
            continue
        initializer, layout_integers, scale_axis = found[0]
        name = initializer.name
        graph.initializer.remove(initializer)
        graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(layout_integers), f"{name}_grid"),
            numpy_helper.from_array(scale if per_axis else scale.reshape(()), f"{name}_scale"),
            numpy_helper.from_array(np.zeros(scale.shape if per_axis else (), dtype=np.int8), f"{name}_zero_point"),
        ])
        attributes = {"axis": scale_axis} if per_axis else {}
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_grid", f"{name}_scale", f"{name}_zero_point"], [name], name=f"{name}_dequantize", **attributes))
        converted[kind] += 1
    for node in reversed(nodes):  # fed by initializers only: first in topological order
        graph.node.insert(0, node)
    onnx.save(model, str(path))
    return converted
