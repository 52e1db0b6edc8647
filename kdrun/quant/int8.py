"""Real int8 CPU kernels for a (materialized) model: dynamic int8 linear layers.

torchao is the successor of ``torch.ao.quantization``, but its int8 path runs fast
on the CPU only under ``torch.compile``; in eager mode (torchao 0.18) it measured
~19x slower than fp32 on a 384x1536 MLP here (scripts/bench_inference.py --torchao). The
deprecated-but-present ``torch.ao.quantization.quantize_dynamic`` uses fbgemm/x86
int8 GEMMs and is faster than fp32 eagerly, so it is what kdrun exports to.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


def export_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose linear layers run int8 x int8 GEMMs (weights per-channel int8,
    activations quantized dynamically per batch). Embeddings and LayerNorm stay fp32."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices, once per layer
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
