"""ONNX Runtime sessions, run through kdrun's own scoring and timing code.

:class:`OnnxRuntimeModel` puts a session behind the interface kdrun's inference code expects of a model
(``forward(input_ids, attention_mask, token_type_ids)`` returning ``.logits``, a device, ``eval()``), so
that the dev score of an exported graph comes from ``kdrun.predict.score_dev_sets`` and its latency from
``kdrun.deployment.measure_latency``: the very code, batches and metrics that measure the PyTorch formats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from kdrun.export.graphs import OUTPUT_NAME


def inference_session(path: Path, threads: int) -> Any:
    """A CPU session on ``threads`` intra-op threads (one inter-op thread: a BERT graph is a chain)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: the CPU provider notes each fallback otherwise
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxRuntimeModel(nn.Module):
    """An ONNX Runtime session with a model's interface (CPU; inference only)."""

    def __init__(self, session: Any):
        super().__init__()
        self.session = session
        self.input_names = [item.name for item in session.get_inputs()]
        # kdrun.predict.model_device reads a parameter's device: this empty one places the session on the CPU.
        self.placement = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None
    ) -> SequenceClassifierOutput:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feed = {}
        for name in self.input_names:
            tensor = given[name]
            if tensor is None:  # a tokenizer that writes no token types: one segment
                tensor = torch.ones_like(input_ids) if name == "attention_mask" else torch.zeros_like(input_ids)
            feed[name] = np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.int64)
        (logits,) = self.session.run([OUTPUT_NAME], feed)
        return SequenceClassifierOutput(logits=torch.from_numpy(logits))
