"""Building BERT students: the shape from config, the vocabulary from the teacher.

A student shares the teacher's tokenizer, so its vocabulary, position and
token-type tables take the teacher's sizes; depth, width, FFN size and heads
come from ``student.*``. ``student=tinybert4`` is the paper's 4-layer, 312-wide
model (14.5M parameters with the BERT vocabulary).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, BertModel, PretrainedConfig

from kdrun.data.tasks import TaskSpec
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
