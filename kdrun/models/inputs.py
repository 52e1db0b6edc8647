"""Which of a batch's tensors a model's forward accepts.

Batches carry ``token_type_ids`` for every model, since a BERT teacher needs them
for sentence pairs; DistilBERT (no token-type embeddings) and the BiLSTM student
reject unknown arguments, so each model gets only what its forward names.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn


@functools.cache
def _named_parameters(forward_owner: type) -> frozenset[str]:
    # Only explicitly named parameters count: transformers' forwards also take **kwargs
    # (passed on to attention functions), where a stray token_type_ids would fail later.
    parameters = inspect.signature(forward_owner.forward).parameters.values()
    return frozenset(p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD)


def forward_inputs(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """``inputs`` without the keys ``model.forward`` does not name."""
    named = _named_parameters(type(model))
    return {k: v for k, v in inputs.items() if k in named}
