"""Which weights of a BERT-family model are quantized, to how many bits, and the fake-quantized layers.

Every ``nn.Linear`` inside encoder layer ``l`` takes layer ``l``'s width; the
embedding tables take ``embedding_bits`` (one range per table); the inputs of every
quantized linear layer take ``activation_bits`` (one dynamic range per tensor). The
pooler and classifier stay in full precision, as their size is negligible.

Fake quantization switches the class of the existing modules (``nn.Linear`` ->
:class:`QuantizedLinear`) instead of wrapping them, so parameter names, and hence
``save_pretrained`` / ``from_pretrained`` and the training loop's checkpoints, are
unchanged: a saved quantized model is the latent full-precision weights plus
``quantization.json``, from which the same grid values are recomputed exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.quant.grid import fake_quantize, quantize_dequantize

PLAN_FILE = "quantization.json"
# Attention output projections: their *input* columns are laid out head after head.
_COLUMN_GROUPED = ("attention.output.dense", "attention.out_lin")
# Query, key and value projections: their output rows are laid out head after head.
_ROW_HEADS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.q_lin", "attention.k_lin", "attention.v_lin")


@dataclass(frozen=True)
class QuantizationPlan:
    """Bits per encoder layer plus the shared settings; saved beside the model as JSON."""

    layer_bits: tuple[int, ...]
    groups: int = 128
    embedding_bits: int | None = 8
    activation_bits: int | None = 8

    def save(self, model_dir: Path) -> None:
        (Path(model_dir) / PLAN_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, model_dir: Path) -> QuantizationPlan | None:
        path = Path(model_dir) / PLAN_FILE
        if not path.is_file():
            return None
        values = json.loads(path.read_text())
        return cls(**{**values, "layer_bits": tuple(values["layer_bits"])})


class QuantizedLinear(nn.Linear):
    """A linear layer computing with its weight (and input) on a b-bit grid."""

    weight_bits: int
    groups: int
    group_axis: int
    group_heads: int  # > 1: the grouped axis is laid out in this many attention heads (groups never span two)
    activation_bits: int | None

    def forward(self, x: Tensor) -> Tensor:
        if self.activation_bits:
            x = quantize_dequantize(x, self.activation_bits)
        weight = quantize_dequantize(self.weight, self.weight_bits, self.groups, self.group_axis, self.group_heads)
        return F.linear(x, weight, self.bias)


class QuantizedEmbedding(nn.Embedding):
    """An embedding table looked up on a b-bit grid (one range for the table)."""

    weight_bits: int

    def forward(self, input_ids: Tensor) -> Tensor:
        weight = quantize_dequantize(self.weight, self.weight_bits)
        return F.embedding(input_ids, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers of a BERT (``encoder.layer``) or DistilBERT (``transformer.layer``) model."""
    base = getattr(model, "base_model", model)
    for container in ("encoder", "transformer"):
        layers = getattr(getattr(base, container, None), "layer", None)
        if layers is not None:
            return list(layers)
    raise TypeError(
        f"{type(model).__name__} has no encoder.layer or transformer.layer: Q-BERT applies to BERT-family models only"
    )


def embedding_tables(model: nn.Module) -> list[nn.Embedding]:
    base = getattr(model, "base_model", model)
    return [m for m in base.embeddings.modules() if isinstance(m, nn.Embedding)]


def layer_linears(layer: nn.Module, heads: int = 1) -> Iterator[tuple[str, nn.Linear, int, int]]:
    """(name, module, group axis, heads along that axis) of each linear map in one encoder layer of a model
    with ``heads`` attention heads (1 for the feed-forward maps, whose rows are not laid out by head)."""
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            axis = 1 if name.endswith(_COLUMN_GROUPED) else 0
            yield name, module, axis, heads if name.endswith(_COLUMN_GROUPED + _ROW_HEADS) else 1


def quantized_linears(model: nn.Module, plan: QuantizationPlan) -> Iterator[tuple[nn.Linear, int, int, int]]:
    """(module, bits, group axis, heads along it) of every weight matrix the plan quantizes."""
    layers = encoder_layers(model)
    if len(plan.layer_bits) != len(layers):
        raise ValueError(f"the plan gives bits for {len(plan.layer_bits)} layers but the model has {len(layers)}")
    heads = getattr(getattr(model, "config", None), "num_attention_heads", 1)
    for layer, bits in zip(layers, plan.layer_bits):
        for _name, module, axis, module_heads in layer_linears(layer, heads):
            yield module, bits, axis, module_heads


def enable_fake_quantization(model: nn.Module, plan: QuantizationPlan) -> nn.Module:
    """Make ``model`` compute on the plan's grids (in place; returns it)."""
    for module, bits, axis, heads in quantized_linears(model, plan):
        module.__class__ = QuantizedLinear
        module.weight_bits, module.groups, module.group_axis, module.group_heads = bits, plan.groups, axis, heads
        module.activation_bits = plan.activation_bits
    if plan.embedding_bits:
        for table in embedding_tables(model):
            table.__class__ = QuantizedEmbedding
            table.weight_bits = plan.embedding_bits
    return model


def materialize(model: nn.Module) -> nn.Module:
    """Write the grid values into the weights and turn the layers back into plain ones (in place).

    The result is an ordinary full-precision model holding exactly the quantized
    weights (activations are no longer quantized): what an int8 kernel export starts from.
    """
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.weight.data = fake_quantize(module.weight, module.weight_bits, module.groups, module.group_axis, module.group_heads)
            module.__class__ = nn.Linear
        elif isinstance(module, QuantizedEmbedding):
            module.weight.data = fake_quantize(module.weight, module.weight_bits)
            module.__class__ = nn.Embedding
    return model
