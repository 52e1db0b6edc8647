"""DistilBERT students initialised from a BERT teacher (Sanh et al., 2019, section 3).

The student is a real ``DistilBertForMaskedLM``: half the teacher's depth, the
same width, no token-type embeddings and no pooler. Its embeddings and its
layers are copies of the teacher's, taking one teacher layer out of two. For a
12-layer teacher the default is the choice of the released DistilBERT
checkpoint, layers 0, 2, 4, 7, 9, 11 (the last layer kept, so the student ends
on the teacher's output representation); for any other depth, every other
layer from the first. The masked-LM head is copied too when the teacher has
one (the released DistilBERT started from BERT's).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import BertConfig, DistilBertConfig, DistilBertForMaskedLM, PreTrainedModel

RELEASED_DISTILBERT_LAYERS = (0, 2, 4, 7, 9, 11)

# DistilBERT parameter name <- BERT parameter name, inside one transformer layer.
_LAYER_NAMES = {
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}
_EMBEDDING_NAMES = ("word_embeddings", "position_embeddings", "LayerNorm")
_HEAD_NAMES = {"vocab_transform": "predictions.transform.dense", "vocab_layer_norm": "predictions.transform.LayerNorm"}


def teacher_layers_to_keep(teacher_layers: int, layers: Sequence[int] | None = None) -> list[int]:
    """The 0-based teacher layers the student copies, checked."""
    if layers is None:
        layers = RELEASED_DISTILBERT_LAYERS if teacher_layers == 12 else range(0, teacher_layers, 2)
    chosen = [int(i) for i in layers]
    if not chosen or any(not 0 <= i < teacher_layers for i in chosen) or chosen != sorted(set(chosen)):
        raise ValueError(
            f"student.layers={list(layers)} must be increasing, distinct teacher layers in 0..{teacher_layers - 1}"
        )
    return chosen


def distilbert_config(teacher: BertConfig, num_layers: int) -> DistilBertConfig:
    """DistilBERT's config with the teacher's width, heads, FFN, vocabulary and positions."""
    if teacher.model_type != "bert":
        raise ValueError(f"student=distil_from_teacher copies BERT layers; the teacher is a {teacher.model_type!r} model")
    return DistilBertConfig(
        vocab_size=teacher.vocab_size,
        max_position_embeddings=teacher.max_position_embeddings,
        n_layers=num_layers,
        n_heads=teacher.num_attention_heads,
        dim=teacher.hidden_size,
        hidden_dim=teacher.intermediate_size,
        dropout=teacher.hidden_dropout_prob,
        attention_dropout=teacher.attention_probs_dropout_prob,
        activation=teacher.hidden_act,
        initializer_range=teacher.initializer_range,
        pad_token_id=teacher.pad_token_id,
        tie_word_embeddings=True,
    )


def teacher_tensor_names(layers: Sequence[int], with_head: bool) -> dict[str, str]:
    """Student (DistilBertForMaskedLM) parameter name -> teacher (BertForMaskedLM) parameter name."""
    names = {}
    for part in _EMBEDDING_NAMES:
        for kind in ("weight", "bias"):
            names[f"distilbert.embeddings.{part}.{kind}"] = f"bert.embeddings.{part}.{kind}"
    for student_layer, teacher_layer in enumerate(layers):
        for student_name, teacher_name in _LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                names[f"distilbert.transformer.layer.{student_layer}.{student_name}.{kind}"] = (
                    f"bert.encoder.layer.{teacher_layer}.{teacher_name}.{kind}"
                )
    if with_head:
        for student_name, teacher_name in _HEAD_NAMES.items():
            for kind in ("weight", "bias"):
                names[f"{student_name}.{kind}"] = f"cls.{teacher_name}.{kind}"
        names["vocab_projector.bias"] = "cls.predictions.bias"
    return {k: v for k, v in names.items() if not k.endswith(("word_embeddings.bias", "position_embeddings.bias"))}


@torch.no_grad()
def distil_from_teacher(teacher: PreTrainedModel, layers: Sequence[int] | None = None) -> DistilBertForMaskedLM:
    """A DistilBERT masked LM whose tensors are copies of the chosen teacher tensors.

    ``teacher`` is a ``BertForMaskedLM`` (head copied) or any BERT model (the
    head of the student then starts at random, as does the whole student when
    ``student.init=random``).
    """
    teacher_state = {name if name.startswith(("bert.", "cls.")) else f"bert.{name}": t for name, t in teacher.state_dict().items()}
    chosen = teacher_layers_to_keep(teacher.config.num_hidden_layers, layers)
    student = DistilBertForMaskedLM(distilbert_config(teacher.config, len(chosen)))
    with_head = "cls.predictions.transform.dense.weight" in teacher_state
    names = teacher_tensor_names(chosen, with_head)
    student_state = student.state_dict()
    for student_name, teacher_name in names.items():
        student_state[student_name].copy_(teacher_state[teacher_name])
    student.tie_weights()
    return student
