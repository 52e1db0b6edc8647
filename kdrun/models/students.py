"""Building students: BERT (TinyBERT), DistilBERT and BiLSTM.

BERT students: the shape from config, the vocabulary from the teacher.

A student shares the teacher's tokenizer, so its vocabulary, position and
token-type tables take the teacher's sizes; depth, width, FFN size and heads
come from ``student.*``. ``student=tinybert4`` is the paper's 4-layer, 312-wide
model (14.5M parameters with the BERT vocabulary).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from kdrun.data.glove import load_glove
from kdrun.data.tasks import TaskSpec
from kdrun.models.bilstm import BiLstmConfig, BiLstmForSequenceClassification, training_vocabulary, word_tokenizer
from kdrun.models.distil_student import distil_from_teacher
from kdrun.models.loading import ModelSetupError, resolve_model_path

SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")


def student_bert_config(student: DictConfig, teacher_config: PretrainedConfig) -> BertConfig:
    if student.hidden_size % student.num_attention_heads:
        raise ModelSetupError(
            f"student.hidden_size={student.hidden_size} is not divisible by student.num_attention_heads="
            f"{student.num_attention_heads}; choose a width that is a multiple of the head count."
        )
    return BertConfig(
        vocab_size=teacher_config.vocab_size,
        max_position_embeddings=teacher_config.max_position_embeddings,
        type_vocab_size=getattr(teacher_config, "type_vocab_size", 2),
        pad_token_id=getattr(teacher_config, "pad_token_id", 0),
        **{key: int(student[key]) for key in SHAPE_KEYS},
    )


def new_general_student(student: DictConfig, teacher_config: PretrainedConfig) -> BertModel:
    """A randomly initialised encoder (no task head) for general distillation."""
    return BertModel(student_bert_config(student, teacher_config), add_pooling_layer=True)


def student_for_task(
    student: DictConfig, teacher_config: PretrainedConfig, task: TaskSpec, init_from: Path | str | None
) -> BertForSequenceClassification:
    """The student with a head for ``task``: random, or initialised from a checkpoint whose shape must match."""
    config = student_bert_config(student, teacher_config)
    config.num_labels = task.num_labels
    config.problem_type = "regression" if task.is_regression else "single_label_classification"
    if init_from is None or str(init_from) == "random":
        return BertForSequenceClassification(config)
    source = resolve_model_path(str(init_from))
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=task.num_labels, problem_type=config.problem_type)
    found = {key: getattr(model.config, key) for key in SHAPE_KEYS}
    wanted = {key: getattr(config, key) for key in SHAPE_KEYS}
    if found != wanted:
        raise ModelSetupError(
            f"The student checkpoint {init_from} has shape {found}, but the student config asks for {wanted}. "
            "Pick the student config that matches the checkpoint (e.g. student=tinybert4) or another checkpoint."
        )
    if model.config.vocab_size != teacher_config.vocab_size:
        raise ModelSetupError(
            f"The student checkpoint {init_from} has a vocabulary of {model.config.vocab_size}, the teacher "
            f"{teacher_config.vocab_size}: distillation needs one shared tokenizer."
        )
    return model


# ------------------------------------------------------------------ DistilBERT students


def distil_student_for_task(
    student: DictConfig, task: TaskSpec, init_from: Path | str | None, teacher_reference: str
) -> PreTrainedModel:
    """A DistilBERT classifier: from a general-distillation output, else copied from the teacher's layers.

    ``init_from`` is a DistilBERT checkpoint (the general_distill stage's model) or
    None; then the encoder is built from ``teacher_reference`` (the pre-trained
    teacher) with ``student.layers``, or at random for ``student.init=random``.
    """
    problem_type = "regression" if task.is_regression else "single_label_classification"
    if init_from is not None:
        return AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(str(init_from)), num_labels=task.num_labels, problem_type=problem_type
        )
    teacher = AutoModel.from_pretrained(resolve_model_path(teacher_reference))
    encoder = distil_from_teacher(teacher, student.layers)
    if student.init == "random":
        encoder = DistilBertForMaskedLM(encoder.config)
    config = DistilBertConfig(**{**encoder.config.to_dict(), "num_labels": task.num_labels, "problem_type": problem_type})
    model = DistilBertForSequenceClassification(config)
    model.distilbert.load_state_dict(encoder.distilbert.state_dict())
    return model


# ---------------------------------------------------------------------- BiLSTM students


def bilstm_student_for_task(
    student: DictConfig, task: TaskSpec, train_texts: list[str], max_length: int
) -> tuple[BiLstmForSequenceClassification, PreTrainedTokenizerFast, dict[str, float]]:
    """A new BiLSTM with a vocabulary of the training texts, its tokenizer, and how GloVe covered it."""
    words = training_vocabulary(train_texts, student.vocab_min_count)
    tokenizer = word_tokenizer(words, max_length)
    pair = task.is_pair
    config = BiLstmConfig(
        vocab_size=len(tokenizer),
        embedding_dim=student.embedding_dim,
        lstm_hidden_size=student.pair_lstm_hidden_size if pair else student.lstm_hidden_size,
        classifier_hidden_size=student.pair_classifier_hidden_size if pair else student.classifier_hidden_size,
        dropout=student.dropout,
        pair=pair,
        num_labels=task.num_labels,
        problem_type="regression" if task.is_regression else "single_label_classification",
    )
    model = BiLstmForSequenceClassification(config)
    coverage = {"vocabulary": float(len(tokenizer))}
    if student.embeddings == "glove":
        coverage.update(_glove_embeddings(model, tokenizer, student.glove))
    elif student.embeddings != "random":
        raise ModelSetupError(f"student.embeddings must be 'glove' or 'random', got {student.embeddings!r}")
    return model, tokenizer, coverage


@torch.no_grad()
def _glove_embeddings(model: BiLstmForSequenceClassification, tokenizer: PreTrainedTokenizerFast, source: str) -> dict[str, float]:
    """Copy GloVe vectors into the embedding rows of the words GloVe knows (the rest stay random)."""
    glove = load_glove(source)
    raw = glove.raw
    if raw.shape[1] != model.config.embedding_dim:
        raise ModelSetupError(
            f"student.embedding_dim={model.config.embedding_dim} but the GloVe vectors of {source} have "
            f"{raw.shape[1]} dimensions; set student.embedding_dim={raw.shape[1]}."
        )
    vocabulary = tokenizer.get_vocab()
    found = [(row, glove.index[word]) for word, row in vocabulary.items() if word in glove]
    if found:
        rows, glove_rows = zip(*found)
        model.embeddings.weight[list(rows)] = raw[list(glove_rows)]
    return {"glove_coverage": len(found) / max(len(vocabulary) - 3, 1)}
