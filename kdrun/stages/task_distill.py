"""Stage task_distill: TinyBERT's task-specific distillation, in its two steps.

Step 1 distils the intermediate layers (embeddings, attention scores, hidden
states) of the fine-tuned teacher into the student on the (augmented) training
set; step 2 distils the prediction layer (soft cross-entropy on the teacher's
logits, MSE for regression, or plain cross-entropy on gold labels for the
"w/o Pred" ablation). The student starts from general distillation's output
when that stage runs before this one, else from ``student.init``. The teacher's
logits for step 2 are computed once, keyed by example id, and kept in the
cache beside the stage outputs under a key of the teacher and the training rows
alone, so every student, ablation and seed of a sweep shares them. Output:
``model/``, the student with its task head (best dev checkpoint of step 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from kdrun.distill.prediction import PredictionLossSettings, prediction_loss
from kdrun.distill.tinybert import StudentWithProjections, TeacherLogits, objective_from_config, tinybert_loss
from kdrun.models.loading import load_checked_config, load_for_sequence_classification, load_model_config, load_tokenizer, save_tokenizer
from kdrun.models.students import bilstm_student_for_task, distil_student_for_task, student_bert_config, student_for_task
from kdrun.metrics import Evaluation
from kdrun.pipeline import PipelineError, Stage, StageOutput, cache_root_of, config_slice, register, stage_key
from kdrun.precision import resolve_precision
from kdrun.predict import main_metric_key, score_dev_sets
from kdrun.stages import task_data
from kdrun.stages.augment import load_augmented
from kdrun.validation import check_tinybert_teacher
from kdrun.train import TrainingJob, get_accelerator, seed_everything, train

PREDICTION_TARGETS = ("teacher", "labels")
STUDENT_KINDS = ("bert", "distilbert", "bilstm")


def needs_teacher(cfg: DictConfig) -> bool:
    """Whether this run reads the fine-tuned teacher (bilstm_nokd trains on gold labels alone)."""
    return cfg.task_distill.intermediate.enabled or (
        cfg.task_distill.prediction.enabled and _labels_weight(cfg) < 1.0
    )


def _labels_weight(cfg: DictConfig) -> float:
    """The weight a of the gold labels in the prediction step (1: labels only, no teacher logits)."""
    d = cfg.distill
    if d.prediction_target == "labels" or (task_data.task_of(cfg).is_regression and d.regression_target == "labels"):
        return 1.0
    return float(d.weights.hard)


def check(cfg: DictConfig) -> None:
    for name in ("prediction_target", "regression_target"):
        if cfg.distill[name] not in PREDICTION_TARGETS:
            raise PipelineError(f"distill.{name} must be one of {PREDICTION_TARGETS}, got '{cfg.distill[name]}'.")
    if cfg.student.kind not in STUDENT_KINDS:
        raise PipelineError(f"student.kind must be one of {STUDENT_KINDS}, got '{cfg.student.kind}'.")
    steps = cfg.task_distill
    if not (steps.intermediate.enabled or steps.prediction.enabled):
        raise PipelineError("task_distill has both steps disabled; enable task_distill.intermediate or task_distill.prediction.")
    stages = list(cfg.pipeline.stages)
    if needs_teacher(cfg) and "finetune_teacher" not in stages[: stages.index("task_distill")]:
        raise PipelineError(
            "task_distill distils the fine-tuned teacher: put finetune_teacher before it in pipeline.stages "
            "(or train on gold labels only: distill.prediction_target=labels and task_distill.intermediate.enabled=false)."
        )
    _prediction_settings(cfg)
    teacher_config = load_checked_config(cfg.teacher.path, cfg.teacher.revision)  # its weights and tokenizer, before compute
    if steps.intermediate.enabled:
        if cfg.student.kind != "bert":
            raise PipelineError(
                f"task_distill.intermediate (TinyBERT's layer losses) needs a BERT student, not student={cfg.student.name}; "
                "set task_distill.intermediate.enabled=false."
            )
        student_config = student_bert_config(cfg.student, teacher_config)
        try:
            objective, _ = objective_from_config(cfg.distill, _intermediate_weights(cfg), student_config, teacher_config)
        except ValueError as error:  # weights, mapping or attention target that cannot work
            raise PipelineError(f"task_distill: {error}") from error
        check_tinybert_teacher(objective, student_config, teacher_config, cfg.teacher.path, "distill.weights")
    task_data.check_data_available(cfg)


def _intermediate_weights(cfg: DictConfig) -> dict[str, float]:
    weights = cfg.distill.weights
    return {"embedding": weights.embedding, "attention": weights.attention, "hidden": weights.hidden, "prediction": 0.0}


def _prediction_settings(cfg: DictConfig) -> PredictionLossSettings:
    d = cfg.distill
    try:
        return PredictionLossSettings(
            kind=d.prediction_loss, temperature=d.temperature, scale_by_t2=d.scale_by_t2, hard_weight=_labels_weight(cfg)
        )
    except ValueError as error:
        raise PipelineError(f"task_distill: {error}") from error


def _student(cfg: DictConfig, task, inputs: dict[str, StageOutput], teacher_config, teacher_tokenizer, train_examples):
    """(student with a task head, its tokenizer, where it started from)."""
    general = inputs.get("general_distill")
    kind = cfg.student.kind
    if kind == "bilstm":
        texts = [t for column in ("text_a", "text_b") for t in train_examples[column] if t]
        student, tokenizer, coverage = bilstm_student_for_task(cfg.student, task, texts, cfg.data.max_seq_length)
        return student, tokenizer, {"init": f"new, embeddings {cfg.student.embeddings}", **coverage}
    if kind == "distilbert":
        init_from = general.path / "model" if general is not None else None
        student = distil_student_for_task(cfg.student, task, init_from, cfg.teacher.path)
        return student, teacher_tokenizer, {"init": str(init_from or f"teacher layers ({cfg.student.init})")}
    init_from = general.path / "model" if general is not None else cfg.student.init
    return student_for_task(cfg.student, teacher_config, task, init_from), teacher_tokenizer, {"init": str(init_from)}


def run(cfg: DictConfig, inputs: dict[str, StageOutput], out_dir: Path) -> dict[str, Any]:
    task = task_data.task_of(cfg)
    accelerator = get_accelerator(cfg.device)
    teacher = None
    if "finetune_teacher" in inputs:
        teacher, teacher_tokenizer = load_for_sequence_classification(str(inputs["finetune_teacher"].path / "model"), task)
        teacher = resolve_precision(cfg.device).inference_model(teacher, copy=False)  # frozen: weights in the run's precision
        teacher.to(accelerator.device).eval().requires_grad_(False)
        teacher_config = teacher.config
    else:  # no fine-tuned teacher (labels only, e.g. TinyBERT's w/o TD): the student still takes the teacher's shape
        teacher_tokenizer = load_tokenizer(cfg.teacher.path, cfg.teacher.revision)
        teacher_config = load_model_config(cfg.teacher.path, cfg.teacher.revision)
    augmented = load_augmented(inputs["augment"], task.is_regression) if "augment" in inputs else None
    train_examples = augmented if augmented is not None else task_data.train_examples(cfg)
    seed_everything(cfg.task_distill.intermediate.train.seed)
    student, tokenizer, summary = _student(cfg, task, inputs, teacher_config, teacher_tokenizer, train_examples)
    collate = task_data.collator(tokenizer, task)
    train_set = task_data.tokenized({"train": train_examples}, tokenizer, cfg)["train"]
    dev_sets = task_data.tokenized(task_data.dev_examples(cfg), tokenizer, cfg)
    summary = {"model_dir": "model", "train_examples": len(train_set), **summary}

    def save_student(model: torch.nn.Module, directory: Path) -> None:
        model.student.save_pretrained(directory)
        save_tokenizer(tokenizer, directory)
        model.save_projections(directory)

    def evaluate(model: torch.nn.Module) -> Evaluation:
        return score_dev_sets(model.student, task, dev_sets, collate, cfg.task_distill.prediction.train.eval_batch_size)

    if cfg.task_distill.intermediate.enabled:
        objective, projections = objective_from_config(cfg.distill, _intermediate_weights(cfg), student.config, teacher.config)
        wrapper = StudentWithProjections(student, projections)
        if "general_distill" in inputs:
            summary["projections_from_general"] = wrapper.load_projections(inputs["general_distill"].path / "model")
        outcome = train(
            TrainingJob(
                model=wrapper,
                train_features=train_set,
                collate=collate,
                compute_loss=tinybert_loss(teacher, objective, task.is_regression),
                save_model=save_student,
                keep_best=False,
                description=f"task_distill step 1 {task.name}",
            ),
            cfg.task_distill.intermediate.train,
            cfg.device,
            out_dir / "step1_intermediate",
        )
        summary["intermediate"] = outcome.summary()
        student = student_for_task(cfg.student, teacher.config, task, outcome.model_dir)

    if cfg.task_distill.prediction.enabled:
        settings = _prediction_settings(cfg)
        logits = None
        if settings.hard_weight < 1.0:
            teacher_set = train_set if tokenizer is teacher_tokenizer else task_data.tokenized({"train": train_examples}, teacher_tokenizer, cfg)["train"]
            teacher_collate = collate if tokenizer is teacher_tokenizer else task_data.collator(teacher_tokenizer, task)
            logits_path = _teacher_logits_path(cfg, inputs)
            logits = TeacherLogits.cached(
                teacher, teacher_set, teacher_collate, cfg.task_distill.prediction.train.eval_batch_size, logits_path,
                resolve_precision(cfg.device),
            )
            summary["teacher_logits"] = str(logits_path)
        seed_everything(cfg.task_distill.prediction.train.seed)
        outcome = train(
            TrainingJob(
                model=StudentWithProjections(student),
                train_features=train_set,
                collate=collate,
                compute_loss=prediction_loss(settings, task.is_regression, logits),
                save_model=save_student,
                evaluate=evaluate,
                best_metric=main_metric_key(task),
                keep_best=cfg.task_distill.keep_best,
                description=f"task_distill step 2 {task.name}",
            ),
            cfg.task_distill.prediction.train,
            cfg.device,
            out_dir / "step2_prediction",
        )
        summary["prediction"] = outcome.summary()
        summary["best_dev"] = outcome.best_metrics
    if not (out_dir / "model").exists():  # else a re-run after an interruption already moved it
        outcome.model_dir.rename(out_dir / "model")
    summary["parameters"] = sum(p.numel() for p in student.parameters())
    return summary


def _teacher_logits_path(cfg: DictConfig, inputs: dict[str, StageOutput]) -> Path:
    """Where the teacher's logits on this run's training rows live: ``<cache>/teacher_logits/<key>``,
    the key naming the teacher and the rows (task, sample, augmentation, length) but not the
    student, since recomputing them (minutes over an augmented set) for every row of an ablation
    sweep would dominate it."""
    rows = config_slice(cfg, ("task", "data.max_seq_length", "data.max_train_examples", "data.sample_seed"))
    rows["device.precision"] = resolve_precision(cfg.device).name  # bf16 logits are another artefact than fp32 ones
    sources = {name: inputs[name].key for name in ("finetune_teacher", "augment") if name in inputs}
    key = stage_key("teacher_logits", "1", rows, sources)
    return cache_root_of(inputs["finetune_teacher"]) / "teacher_logits" / f"{key}.safetensors"


STAGE = register(
    Stage(
        name="task_distill",
        version="3",  # 3: fit_dense learnt at equal widths; 2: a constant predictor is never kept as the best
        run=run,
        check=check,
        reads=(
            "task",
            "student",
            "distill",
            "data.max_seq_length",
            "data.max_train_examples",
            "data.max_eval_examples",
            "data.sample_seed",
            "task_distill",
        ),
        # The teacher's directory too: its tokenizer and shape make the student when no fine-tuned teacher runs.
        sources=("glue", "teacher", "student.init", "student.glove"),
        uses=("finetune_teacher", "general_distill", "augment"),
        wants=lambda cfg, name: name != "finetune_teacher" or needs_teacher(cfg),
        produces_model=True,
    )
)
