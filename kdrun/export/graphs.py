"""PyTorch model -> ONNX graphs: the fp32 graph, ONNX Runtime's optimizer, int8 dynamic quantization.

Every graph takes ``input_ids``, ``attention_mask`` and (when the model reads them) ``token_type_ids``,
int64 of shape [batch, sequence] with both axes dynamic, and returns ``logits`` [batch, labels].

- Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript-based exporter. torch 2.13's
  default (dynamo) exporter needs ``onnxscript``, one more dependency, and is the one that still
  changes from release to release; the TorchScript exporter covers BERT-family models and plain LSTMs
  fully and is what ONNX Runtime's transformer optimizer was written against. It warns that it is
  deprecated; the warning is silenced here and the choice is in docs/export.md.
- BERT-family models are traced with the additive 4-D attention mask computed in the graph, which
  transformers passes through unchanged: with a 2-D mask, transformers decides in Python (at trace
  time) whether a batch has padding at all, and a trace of an unpadded batch would drop the mask.
- The BiLSTM student packs its sequences (``pack_padded_sequence``), which the exporter cannot trace.
  Its graph runs the two directions as two plain LSTMs instead: the forward one over the padded batch,
  read at each row's last word, the backward one over each row reversed within its own length, read at
  the same place. That is what packing computes, with padding never entering a recurrence.
- Q-BERT models are exported with their weights written onto their grids (``materialize``) in fp32:
  see docs/export.md for why the grids are not carried as QDQ nodes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from kdrun.models.bilstm import BiLstmForSequenceClassification, _split_pair, pair_features
from kdrun.models.capture import attention_implementation
from kdrun.models.inputs import forward_inputs

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "logits"
DYNAMIC_AXES = {0: "batch", 1: "sequence"}


class _LogitsGraph(nn.Module):
    """Token tensors in (positionally, in ``names`` order), logits out: what is traced."""

    def __init__(self, model: nn.Module, names: list[str], additive_mask: bool):
        super().__init__()
        self.model = model
        self.names = names
        self.additive_mask = additive_mask

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        inputs = dict(zip(self.names, tensors))
        if self.additive_mask:
            keep = inputs["attention_mask"].unsqueeze(1).unsqueeze(2).to(torch.float32)
            inputs["attention_mask"] = (1.0 - keep) * torch.finfo(torch.float32).min
        return self.model(**inputs).logits


def _last_states(outputs: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``outputs`` [batch, time, hidden] at time ``last`` [batch] of each row."""
    index = last.view(-1, 1, 1).expand(-1, 1, outputs.shape[-1])
    return outputs.gather(1, index).squeeze(1)


def _encode_unpacked(self: BiLstmForSequenceClassification, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``BiLstmForSequenceClassification.encode`` without packing (see the module docstring)."""
    last = lengths.clamp_min(1) - 1
    embedded = self.embeddings(input_ids)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    reversed_index = (last.unsqueeze(1) - positions).clamp_min(0)
    reversed_embedded = embedded.gather(1, reversed_index.unsqueeze(-1).expand(-1, -1, embedded.shape[-1]))
    forward_outputs, _ = self.forward_lstm(embedded)
    backward_outputs, _ = self.backward_lstm(reversed_embedded)
    return torch.cat([_last_states(forward_outputs, last), _last_states(backward_outputs, last)], dim=-1)


def _forward_unpacked(
    self: BiLstmForSequenceClassification, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
) -> SequenceClassifierOutput:
    """``BiLstmForSequenceClassification.forward`` for inference, a pair's two sentences encoded as one batch (the
    exporter mishandles an LSTM module traced twice, and one pass over 2 x batch rows is faster anyway)."""
    lengths = attention_mask.sum(dim=1)
    if not self.config.pair:
        return SequenceClassifierOutput(logits=self.classifier(self.encode(input_ids, lengths)))
    if token_type_ids is None:
        raise ValueError("a pair BiLSTM needs token_type_ids (0: first sentence, 1: [SEP] and second)")
    (first_ids, first_lengths), (second_ids, second_lengths) = _split_pair(input_ids, attention_mask, token_type_ids, self.config.pad_token_id)
    both = self.encode(torch.cat([first_ids, second_ids]), torch.cat([first_lengths, second_lengths]))
    rows = input_ids.shape[0]
    return SequenceClassifierOutput(logits=self.classifier(pair_features(both[:rows], both[rows:])))


def _one_direction(lstm: nn.LSTM, suffix: str) -> nn.LSTM:
    """A unidirectional LSTM holding one direction's weights of the bidirectional ``lstm``."""
    single = nn.LSTM(lstm.input_size, lstm.hidden_size, batch_first=True)
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(single, name).copy_(getattr(lstm, name + suffix))
    return single


def unpacked_bilstm(model: BiLstmForSequenceClassification) -> BiLstmForSequenceClassification:
    """A copy of the BiLSTM student that computes the same logits without packed sequences."""
    graph = copy.deepcopy(model).eval()
    graph.forward_lstm = _one_direction(model.lstm, "")
    graph.backward_lstm = _one_direction(model.lstm, "_reverse")
    graph.encode = types.MethodType(_encode_unpacked, graph)
    graph.forward = types.MethodType(_forward_unpacked, graph)
    return graph


def graph_input_names(model: nn.Module, example: Mapping[str, torch.Tensor]) -> list[str]:
    """The inputs of ``INPUT_NAMES`` that ``example`` has and the model's forward names, in that order."""
    named = forward_inputs(model, example)
    return [name for name in INPUT_NAMES if name in named]


def export_onnx(model: nn.Module, example: Mapping[str, torch.Tensor], path: Path, opset: int) -> list[str]:
    """Write ``model`` (eval mode, CPU) as an ONNX graph with dynamic batch and sequence axes, check it, and
    return its input names. ``example``: a tokenized batch, padded (its values only guide the trace)."""
    names = graph_input_names(model, example)
    is_bilstm = isinstance(model, BiLstmForSequenceClassification)
    inner = unpacked_bilstm(model) if is_bilstm else model
    graph = _LogitsGraph(inner, names, additive_mask=not is_bilstm).eval()
    # Eager attention traces to the plainest graph (MatMul, scale, mask, Softmax, MatMul), the pattern ONNX
    # Runtime's fusions look for; scaled_dot_product_attention adds guards for fully masked rows.
    with contextlib.nullcontext() if is_bilstm else attention_implementation(model, "eager"), warnings.catch_warnings():
        # The exporter's own deprecation notice, and tracer warnings about shapes read in Python (all of
        # them constant for a given model, which is what the dynamic-axes test checks).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            tuple(example[name] for name in names),
            str(path),
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_axes={**{name: DYNAMIC_AXES for name in names}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    check_graph(path, full=True)
    import onnx

    return [value.name for value in onnx.load(str(path), load_external_data=False).graph.input]


def check_graph(path: Path, full: bool = False) -> None:
    """``onnx.checker`` on a written graph; ``full`` adds ONNX shape inference (for graphs of standard ops:
    ONNX Runtime's contrib ops in optimized and quantized graphs are unknown to it)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=full)


def optimize_bert(source: Path, target: Path, config: Any) -> dict[str, int] | None:
    """ONNX Runtime's transformer optimizer (fusions of LayerNorm, residual + LayerNorm, bias + GELU and,
    where its pattern matches, attention) on a BERT-family graph; None for models it does not apply to."""
    if getattr(config, "model_type", None) != "bert":
        return None
    from onnxruntime.transformers import optimizer

    optimized = optimizer.optimize_model(
        str(source), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
    )
    optimized.save_model_to_file(str(target))
    check_graph(target)
    return {name: count for name, count in optimized.get_fused_operator_statistics().items() if count}


def quantize_int8(source: Path, target: Path, per_channel: bool) -> None:
    """ONNX Runtime dynamic quantization: int8 weights (per output channel or per matrix, symmetric), uint8
    activations quantized per batch at run time, int8 GEMMs (VNNI where the CPU has it). LSTMs and
    embedding lookups are quantized too."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice to the root logger (pre-processing, meant for static quantization)
    try:
        quantize_dynamic(
            str(source),
            str(target),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            # The exporter's graphs leave some intermediate types to shape inference, which the quantizer's
            # does not always reach; every activation here is fp32.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)
    check_graph(target)
