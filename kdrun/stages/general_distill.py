"""Stage general_distill: task-agnostic distillation on a plain-text corpus.

``distill=tinybert``: the pre-trained (not fine-tuned) teacher teaches a randomly
initialised student its attention scores and hidden states (and, optionally,
embeddings) on packed corpus sequences. Output: ``model/``, a "general TinyBERT"
encoder (``save_pretrained`` with tokenizer and the learnt width projections).

``distill=distilbert``: a student copied from every other teacher layer learns
the triple loss (soft masked-LM targets, its own MLM loss, cosine of hidden
states) on MLM-corrupted corpus sequences. The teacher's MLM head comes from a
preceding fit_mlm_head stage when there is one (the embedded MiniLM has none).
Output: ``model/``, a ``DistilBertForMaskedLM``.

Task distillation starts from either output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import AutoModel, DistilBertForMaskedLM

from kdrun.data.batching import PaddingCollator
from kdrun.data.corpus import check_corpus, corpus_dataset
from kdrun.data.mlm import MaskingCollator
from kdrun.distill.distilbert import MaskedLmStudent, TripleLossSettings, triple_loss
from kdrun.distill.tinybert import StudentWithProjections, objective_from_config, tinybert_loss
from kdrun.models.loading import load_checked_config, load_tokenizer, resolve_model_path, save_tokenizer
from kdrun.models.distil_student import distil_from_teacher, distilbert_config, teacher_layers_to_keep
from kdrun.models.masked_lm import load_masked_lm
from kdrun.models.students import new_general_student, student_bert_config
from kdrun.pipeline import PipelineError, Stage, StageOutput, register
from kdrun.precision import resolve_precision
from kdrun.train import TrainingJob, get_accelerator, seed_everything, train
from kdrun.validation import check_tinybert_teacher


def check(cfg: DictConfig) -> None:
    if cfg.distill.name == "distilbert":
        _triple_loss_settings(cfg)
        if cfg.student.kind != "distilbert":
            raise PipelineError(f"distill=distilbert needs student=distil_from_teacher, not student={cfg.student.name}.")
        teacher_config = load_checked_config(cfg.teacher.path, cfg.teacher.revision)
        try:
            kept = teacher_layers_to_keep(teacher_config.num_hidden_layers, cfg.student.layers)
            distilbert_config(teacher_config, len(kept))  # the student copies BERT layers: a BERT teacher
        except ValueError as error:
            raise PipelineError(f"general_distill: {error}") from error
        check_corpus(cfg.data.corpus)
        return
    teacher_config = load_checked_config(cfg.teacher.path, cfg.teacher.revision)
    student_config = student_bert_config(cfg.student, teacher_config)
    try:
        objective, _ = objective_from_config(cfg.distill, cfg.general_distill.weights, student_config, teacher_config)
    except ValueError as error:  # weights, mapping or attention target that cannot work
        raise PipelineError(f"general_distill: {error}") from error
    check_tinybert_teacher(objective, student_config, teacher_config, cfg.teacher.path, "general_distill.weights")
    check_corpus(cfg.data.corpus)


def run(cfg: DictConfig, inputs: dict[str, StageOutput], out_dir: Path) -> dict[str, Any]:
    if cfg.distill.name == "distilbert":
        return run_distilbert(cfg, inputs, out_dir)
    settings = cfg.general_distill
    accelerator = get_accelerator(cfg.device)
    seed_everything(settings.train.seed)
    tokenizer = load_tokenizer(cfg.teacher.path, cfg.teacher.revision)
    teacher = AutoModel.from_pretrained(resolve_model_path(cfg.teacher.path), revision=cfg.teacher.revision)
    teacher = _frozen(teacher, cfg)
    teacher.to(accelerator.device).eval().requires_grad_(False)
    student = new_general_student(cfg.student, teacher.config)
    objective, projections = objective_from_config(cfg.distill, settings.weights, student.config, teacher.config)
    corpus = corpus_dataset(cfg.data.corpus, tokenizer, settings.max_seq_length, settings.max_sequences, out_dir / "corpus")

    def save_model(model: torch.nn.Module, directory: Path) -> None:
        model.student.save_pretrained(directory)
        save_tokenizer(tokenizer, directory)
        model.save_projections(directory)

    job = TrainingJob(
        model=StudentWithProjections(student, projections),
        train_features=corpus,
        collate=PaddingCollator(tokenizer),
        compute_loss=tinybert_loss(teacher, objective, is_regression=False),
        save_model=save_model,
        description="general_distill",
    )
    outcome = train(job, settings.train, cfg.device, out_dir)
    return {
        "model_dir": "model",
        "corpus_sequences": len(corpus),
        "corpus_tokens": int(sum(corpus["length"])),
        "parameters": sum(p.numel() for p in student.parameters()),
        "sequences_per_second": round(outcome.examples_per_second, 2),
        **outcome.summary(),
    }


def _frozen(teacher: torch.nn.Module, cfg: DictConfig) -> torch.nn.Module:
    """The teacher as it runs frozen in the run's precision (weights in bf16 when that is the precision)."""
    return resolve_precision(cfg.device).inference_model(teacher, copy=False)


def _triple_loss_settings(cfg: DictConfig) -> TripleLossSettings:
    d = cfg.distill
    try:
        return TripleLossSettings(ce=d.weights.ce, mlm=d.weights.mlm, cos=d.weights.cos, temperature=d.temperature, ce_positions=d.ce_positions)
    except ValueError as error:
        raise PipelineError(f"general_distill: {error}") from error


def run_distilbert(cfg: DictConfig, inputs: dict[str, StageOutput], out_dir: Path) -> dict[str, Any]:
    settings = cfg.general_distill
    accelerator = get_accelerator(cfg.device)
    seed_everything(settings.train.seed)
    fitted = inputs.get("fit_mlm_head")
    teacher_reference = str(fitted.path / fitted.summary["model_dir"]) if fitted is not None else cfg.teacher.path
    teacher, tokenizer = load_masked_lm(teacher_reference, None if fitted is not None else cfg.teacher.revision)
    teacher.to(accelerator.device).eval().requires_grad_(False)
    student = distil_from_teacher(teacher, cfg.student.layers)  # from the fp32 weights
    teacher = _frozen(teacher, cfg)
    if cfg.student.init == "random":  # Table 4's "random initialisation" row
        student = DistilBertForMaskedLM(student.config)
    corpus = corpus_dataset(cfg.data.corpus, tokenizer, settings.max_seq_length, settings.max_sequences, out_dir / "corpus")

    def save_model(model: torch.nn.Module, directory: Path) -> None:
        model.mlm.save_pretrained(directory)
        save_tokenizer(tokenizer, directory)

    job = TrainingJob(
        model=MaskedLmStudent(student),
        train_features=corpus,
        collate=MaskingCollator(tokenizer, settings.mlm_probability, settings.train.seed),
        compute_loss=triple_loss(teacher, _triple_loss_settings(cfg)),
        save_model=save_model,
        description="general_distill (DistilBERT)",
    )
    outcome = train(job, settings.train, cfg.device, out_dir)
    return {
        "model_dir": "model",
        "teacher_mlm": teacher_reference,
        "student_layers": teacher_layers_to_keep(teacher.config.num_hidden_layers, cfg.student.layers),
        "init": cfg.student.init,
        "corpus_sequences": len(corpus),
        "corpus_tokens": int(sum(corpus["length"])),
        "parameters": sum(p.numel() for p in student.parameters()),
        "sequences_per_second": round(outcome.examples_per_second, 2),
        **outcome.summary(),
    }


STAGE = register(
    Stage(
        name="general_distill",
        version="2",  # 2: fit_dense is learnt at equal widths too (TinyBERT-6), as in the official code
        run=run,
        check=check,
        reads=(
            "teacher.revision",
            "student.num_hidden_layers",
            "student.hidden_size",
            "student.intermediate_size",
            "student.num_attention_heads",
            "student.kind",
            "student.init",
            "student.layers",
            "distill.name",
            "distill.attention_target",
            "distill.mapping",
            "distill.weights.ce",
            "distill.weights.mlm",
            "distill.weights.cos",
            "distill.temperature",
            "distill.ce_positions",
            "general_distill",
        ),
        sources=("teacher", "corpus", "student.init"),
        uses=("fit_mlm_head",),
        wants=lambda cfg, name: cfg.distill.name == "distilbert",
    )
)
