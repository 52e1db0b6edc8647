"""Capture what layer distillation reads (TinyBERT, MiniLM) from unmodified Hugging Face BERT-family models.

No modeling code is forked. transformers 5 routes every self-attention call through
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)``, so this module
registers one extra implementation, ``"kdrun_capture"``, with ``AttentionInterface`` (plus the
``sdpa`` mask builder under the same name with ``AttentionMaskInterface``: without a registered
mask function transformers silently builds *no* padding mask for an unknown implementation).
During a capture the model is switched to it with ``model.set_attn_implementation`` and switched
back afterwards, so the saved config and later loads are unaffected.

How a call knows its layer: before the forward pass, the self-attention module of every requested
layer (``encoder.layer[n - 1].attention.self``) gets a small probe object as an instance attribute
(``_kdrun_capture_probe``) holding its 1-based layer number and where to store the result; the
attention function receives that module as its first argument and reads the probe. Modules without
a probe (layers nobody asked for) are delegated to the registered fused ``sdpa`` function, so they
stay as fast as usual. Probes are removed after the call. This does not rely on
``module.layer_idx`` (0-based, and only meaningful for the KV cache).

Captured layers run the same arithmetic as transformers' eager attention: scores = QK^T * scaling,
plus the additive mask (0 / dtype-min, as the eager mask builder makes it), softmax, dropout,
times V. Recorded are either the scores *without* the additive mask (``attention_target="scores"``;
the loss zeroes padded keys itself) or the softmax probabilities before dropout (``"probs"``), and,
for ``value_layers``, the value vectors V the attention function received, [batch, heads, key, head
size] (MiniLM's value relation; every position, padding included).

Hidden states and embeddings come from forward hooks on the encoder layers and the embeddings
module, so only requested layers are kept. With ``want_logits=False`` the base model
(``model.base_model``, e.g. ``model.bert``) is run instead of the full model, which skips the
classifier head (dropout + linear); the pooler, part of the base model, still runs.

Everything captured stays in the autograd graph (the student trains through it); the teacher can
be run under ``torch.inference_mode()``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kdrun.models.inputs import forward_inputs

CAPTURE_IMPLEMENTATION = "kdrun_capture"
ATTENTION_TARGETS = ("scores", "probs")
_PROBE_ATTR = "_kdrun_capture_probe"
# Keys a sequence-classification forward accepts but the base model does not, or that we never want.
_NOT_MODEL_INPUTS = ("labels",)
_NO_HEAD = (
    "{name} has no prediction head, so it has no logits; load it with a task head "
    "(e.g. AutoModelForSequenceClassification) or do not request logits"
)


@dataclass
class CapturedOutputs:
    """What one forward pass exposed; layer dictionaries are keyed by 1-based layer number."""

    embeddings: Tensor | None = None
    hidden_states: dict[int, Tensor] = field(default_factory=dict)
    attention_scores: dict[int, Tensor] = field(default_factory=dict)  # [batch, heads, query, key]
    values: dict[int, Tensor] = field(default_factory=dict)  # [batch, heads, key, head size]
    logits: Tensor | None = None


@dataclass
class _Probe:
    """Attached to a self-attention module while its layer is being captured."""

    layer: int
    target: str
    sink: dict[int, Tensor] | None  # attention maps, when this layer's are wanted
    values: dict[int, Tensor] | None = None  # value vectors, when this layer's are wanted


def _capturing_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """Eager attention that records scores/probs for probed modules; fused SDPA for all others."""
    probe: _Probe | None = getattr(module, _PROBE_ATTR, None)
    if probe is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    weights = scores
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            # The same additive mask transformers' eager_mask builds from this boolean one.
            minimum = torch.finfo(scores.dtype).min
            attention_mask = torch.where(
                attention_mask,
                torch.zeros((), dtype=scores.dtype, device=scores.device),
                torch.full((), minimum, dtype=scores.dtype, device=scores.device),
            )
        weights = weights + attention_mask
    probs = nn.functional.softmax(weights, dim=-1)
    if probe.sink is not None:
        probe.sink[probe.layer] = scores if probe.target == "scores" else probs
    if probe.values is not None:
        probe.values[probe.layer] = value
    dropped = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(dropped, value).transpose(1, 2).contiguous()
    return output, probs


def _ensure_registered() -> None:
    """Register the capturing attention and its mask builder once per process (idempotent)."""
    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capturing_attention)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


def _base_model(model: PreTrainedModel) -> nn.Module:
    base = getattr(model, "base_model", model)
    if not hasattr(base, "encoder") or not hasattr(base.encoder, "layer") or not hasattr(base, "embeddings"):
        raise TypeError(
            f"{type(model).__name__} is not a BERT-style encoder (expected base_model.embeddings and "
            "base_model.encoder.layer); capture supports BERT-family models only"
        )
    return base


def _self_attention(layer: nn.Module, number: int) -> nn.Module:
    try:
        return layer.attention.self
    except AttributeError as error:
        raise TypeError(
            f"encoder layer {number} has no attention.self module; capture supports BERT-family layouts only"
        ) from error


def unsupported_because(model: PreTrainedModel) -> str | None:
    """Why capture cannot read this model's layers (None: it can); for checks before any compute."""
    try:
        _self_attention(_base_model(model).encoder.layer[0], 1)
    except TypeError as error:
        return str(error)
    return None


def _check_layers(requested: set[int], available: int, what: str) -> None:
    outside = sorted(n for n in requested if not 1 <= n <= available)
    if outside:
        raise ValueError(f"{what} layers {outside} do not exist: the model has layers 1..{available} (1-based)")


@contextmanager
def attention_implementation(model: PreTrainedModel, implementation: str) -> Iterator[None]:
    """Temporarily switch the model's attention implementation; the original is restored on exit."""
    original = model.config._attn_implementation
    if original == implementation:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        if model.config._attn_implementation != implementation:
            # transformers only warns when a model class cannot switch; capturing would then silently miss layers.
            raise RuntimeError(
                f"{type(model).__name__} did not switch to the {implementation!r} attention implementation "
                "(it does not dispatch through transformers' AttentionInterface)"
            )
        yield
    finally:
        model.set_attn_implementation(original)


@contextmanager
def _probes(
    modules: Mapping[int, nn.Module], target: str, captured: CapturedOutputs, attention_layers: set[int], value_layers: set[int]
) -> Iterator[None]:
    for number, module in modules.items():
        sink = captured.attention_scores if number in attention_layers else None
        values = captured.values if number in value_layers else None
        setattr(module, _PROBE_ATTR, _Probe(number, target, sink, values))
    try:
        yield
    finally:
        for module in modules.values():
            module.__dict__.pop(_PROBE_ATTR, None)


def _layer_output(output: Any) -> Tensor:
    """Encoder layers return a tensor in transformers 5 (a tuple in 4.x); take the hidden states."""
    return output[0] if isinstance(output, (tuple, list)) else output


def forward_with_capture(
    model: PreTrainedModel,
    inputs: Mapping[str, Any],
    attention_layers: set[int],
    hidden_layers: set[int],
    want_embeddings: bool,
    want_logits: bool,
    attention_target: str = "scores",
    value_layers: set[int] = frozenset(),
) -> CapturedOutputs:
    """Run ``model`` on ``inputs`` once and return only the requested internals.

    ``attention_layers`` / ``hidden_layers`` are 1-based layer numbers. Attention maps are
    [batch, heads, query, key]: pre-softmax scores QK^T/sqrt(d_k) *without* the padding mask for
    ``attention_target="scores"``, or softmax probabilities (before dropout) for ``"probs"``.
    ``value_layers``: 1-based layers whose value vectors [batch, heads, key, head size] to keep.
    ``labels`` in ``inputs`` are ignored (no loss is computed). See the module docstring for how
    layers are identified and why un-requested layers keep using fused SDPA.
    """
    if attention_target not in ATTENTION_TARGETS:
        raise ValueError(f"attention_target must be one of {ATTENTION_TARGETS}, got {attention_target!r}")
    if getattr(model.config, "is_decoder", False):
        raise ValueError("capture supports bidirectional encoders only; this model is configured as a decoder")
    if not (attention_layers or hidden_layers or want_embeddings or value_layers):
        # Logits only (prediction-layer distillation): a plain forward, for any model with a
        # head, BERT-style or not (DistilBERT, the BiLSTM student).
        if not want_logits:
            return CapturedOutputs()
        plain = {k: v for k, v in forward_inputs(model, inputs).items() if k not in _NOT_MODEL_INPUTS}
        logits = getattr(model(**plain), "logits", None)
        if logits is None:
            raise ValueError(_NO_HEAD.format(name=type(model).__name__))
        return CapturedOutputs(logits=logits)
    base = _base_model(model)
    layers = base.encoder.layer
    _check_layers(set(attention_layers), len(layers), "attention")
    _check_layers(set(hidden_layers), len(layers), "hidden-state")
    _check_layers(set(value_layers), len(layers), "value")
    if want_logits and base is model:
        raise ValueError(_NO_HEAD.format(name=type(model).__name__))

    captured = CapturedOutputs()
    model_inputs = {k: v for k, v in forward_inputs(model, inputs).items() if k not in _NOT_MODEL_INPUTS}

    def keep_embeddings(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.embeddings = _layer_output(output)

    def keep_hidden(number: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured.hidden_states[number] = _layer_output(output)

        return hook

    with ExitStack() as stack:
        if want_embeddings:
            stack.callback(base.embeddings.register_forward_hook(keep_embeddings).remove)
        for number in sorted(hidden_layers):
            stack.callback(layers[number - 1].register_forward_hook(keep_hidden(number)).remove)
        probed = set(attention_layers) | set(value_layers)
        if probed:
            _ensure_registered()
            modules = {number: _self_attention(layers[number - 1], number) for number in sorted(probed)}
            stack.enter_context(attention_implementation(model, CAPTURE_IMPLEMENTATION))
            stack.enter_context(_probes(modules, attention_target, captured, set(attention_layers), set(value_layers)))
        if want_logits:
            captured.logits = model(**model_inputs, return_dict=True).logits
        else:
            base(**model_inputs, return_dict=True)
    missing = sorted((set(attention_layers) - set(captured.attention_scores)) | (set(value_layers) - set(captured.values)))
    if missing:
        raise RuntimeError(f"attention of layers {missing} was requested but never computed; is this a BERT encoder?")
    return captured
