"""Stage general_distill: TinyBERT's general distillation on a plain-text corpus.

The pre-trained (not fine-tuned) teacher teaches a randomly initialised
student its attention scores and hidden states (and, optionally, embeddings)
on packed corpus sequences. Output: ``model/``, a "general TinyBERT" encoder
(``save_pretrained`` with tokenizer and the learnt width projections) that task
distillation starts from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import AutoModel

from kdrun.data.batching import PaddingCollator
from kdrun.data.corpus import check_corpus, corpus_dataset
from kdrun.distill.tinybert import StudentWithProjections, objective_from_config, tinybert_loss
from kdrun.models.loading import load_checked_config, load_tokenizer, resolve_model_path
from kdrun.models.students import new_general_student, student_bert_config
from kdrun.pipeline import PipelineError, Stage, StageOutput, register
from kdrun.train import TrainingJob, get_accelerator, seed_everything, train


def check(cfg: DictConfig) -> None:
    teacher_config = load_checked_config(cfg.teacher.path, cfg.teacher.revision)
    student_config = student_bert_config(cfg.student, teacher_config)
    try:
        objective_from_config(cfg.distill, cfg.general_distill.weights, student_config, teacher_config)
    except ValueError as error:  # weights, mapping or attention target that cannot work
        raise PipelineError(f"general_distill: {error}") from error
    check_corpus(cfg.data.corpus)


def run(cfg: DictConfig, inputs: dict[str, StageOutput], out_dir: Path) -> dict[str, Any]:
    settings = cfg.general_distill
    accelerator = get_accelerator(cfg.device)
    seed_everything(settings.train.seed)
    tokenizer = load_tokenizer(cfg.teacher.path, cfg.teacher.revision)
    teacher = AutoModel.from_pretrained(resolve_model_path(cfg.teacher.path), revision=cfg.teacher.revision)
    teacher.to(accelerator.device).eval().requires_grad_(False)
    student = new_general_student(cfg.student, teacher.config)
    objective, projections = objective_from_config(cfg.distill, settings.weights, student.config, teacher.config)
    corpus = corpus_dataset(cfg.data.corpus, tokenizer, settings.max_seq_length, settings.max_sequences, out_dir / "corpus")

    def save_model(model: torch.nn.Module, directory: Path) -> None:
        model.student.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        model.save_projections(directory)

    job = TrainingJob(
        model=StudentWithProjections(student, projections),
        train_features=corpus,
        collate=PaddingCollator(tokenizer),
        compute_loss=tinybert_loss(teacher, objective, is_regression=False, autocast=accelerator.autocast),
        save_model=save_model,
        description="general_distill",
    )
    outcome = train(job, settings.train, cfg.device, out_dir)
    return {
        "model_dir": "model",
        "corpus_sequences": len(corpus),
        "corpus_tokens": int(sum(corpus["length"])),
        "parameters": sum(p.numel() for p in student.parameters()),
        **outcome.summary(),
    }


STAGE = register(
    Stage(
        name="general_distill",
        run=run,
        check=check,
        reads=(
            "teacher.path",
            "teacher.revision",
            "student.num_hidden_layers",
            "student.hidden_size",
            "student.intermediate_size",
            "student.num_attention_heads",
            "distill.attention_target",
            "distill.mapping",
            "data.corpus",
            "general_distill",
        ),
    )
)
