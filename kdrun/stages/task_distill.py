"""Stage task_distill: task-specific distillation, in two steps.

Step 1 distils the intermediate layers of the fine-tuned teacher into the student on
the (augmented) training set, with the method's layer objective (``kdrun/methods``:
TinyBERT's embeddings, attention scores and hidden states, MiniLM's last-layer
relations); step 2 distils the prediction layer (the method's settings: soft
cross-entropy on the teacher's logits, MSE for regression or Tang et al., or plain
cross-entropy on gold labels for the "w/o Pred" ablation). The student starts from
general distillation's output when that stage runs before this one, else from
``student.init``. The teacher's logits for step 2 come from the teacher_logits stage
(keyed by the teacher and the training rows alone, so every student, ablation and
seed of a sweep shares them). Output: ``model/``, the student with its task head
(best dev checkpoint of step 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from kdrun.contract import PipelineError, StageOutput
from kdrun.distill.layers import StudentWithProjections, layer_loss
from kdrun.distill.prediction import prediction_loss
from kdrun.distill.teacher_logits import TeacherLogits
from kdrun.methods import method_of
from kdrun.models.loading import load_checked_config, load_for_sequence_classification, load_model_config, load_tokenizer, save_tokenizer
from kdrun.models.students import bilstm_student_for_task, distil_student_for_task, student_for_task
from kdrun.metrics import Evaluation
from kdrun.precision import resolve_precision
from kdrun.predict import main_metric_key, score_dev_sets
from kdrun.stages import needs_teacher, needs_teacher_logits, task_data
from kdrun.train import TrainingJob, get_accelerator, seed_everything, train


def check(cfg: DictConfig) -> None:
    steps = cfg.task_distill
    if not (steps.intermediate.enabled or steps.prediction.enabled):
        raise PipelineError("task_distill has both steps disabled; enable task_distill.intermediate or task_distill.prediction.")
    stages = list(cfg.pipeline.stages)
    if needs_teacher(cfg) and "finetune_teacher" not in stages[: stages.index("task_distill")]:
        raise PipelineError(
            "task_distill distils the fine-tuned teacher: put finetune_teacher before it in pipeline.stages "
            "(or train on gold labels only: distill.prediction_target=labels and task_distill.intermediate.enabled=false)."
        )
    if needs_teacher_logits(cfg) and "teacher_logits" not in stages[: stages.index("task_distill")]:
        raise PipelineError(
            "task_distill learns the teacher's logits: put teacher_logits after finetune_teacher (and augment) and before "
            "task_distill in pipeline.stages (or train on gold labels only: distill.prediction_target=labels)."
        )
    method = method_of(cfg)
    method.check(cfg, "task_distill")
    method.prediction_settings(cfg.distill, task_data.task_of(cfg).is_regression)
    load_checked_config(cfg.teacher.path, cfg.teacher.revision)  # its weights and tokenizer, before compute
    task_data.check_data_available(cfg)


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
    method = method_of(cfg)
    task = task_data.task_of(cfg)
    accelerator = get_accelerator(cfg.device)
    teacher = None
    if cfg.task_distill.intermediate.enabled:  # step 1 runs the fine-tuned teacher (step 2 reads teacher_logits)
        teacher, teacher_tokenizer = load_for_sequence_classification(str(inputs["finetune_teacher"].path / "model"), task)
        teacher = resolve_precision(cfg.device).inference_model(teacher, copy=False)  # frozen: weights in the run's precision
        teacher.to(accelerator.device).eval().requires_grad_(False)
        teacher_config = teacher.config
    else:  # only the teacher's shape and tokenizer (the fine-tuned one's when it ran; labels only, e.g. w/o TD: the pre-trained one's)
        fitted = inputs.get("finetune_teacher")
        path, revision = (str(fitted.path / "model"), None) if fitted is not None else (cfg.teacher.path, cfg.teacher.revision)
        teacher_tokenizer = load_tokenizer(path, revision)
        teacher_config = load_model_config(path, revision)
    train_examples = task_data.distillation_rows(cfg, inputs, task.is_regression)
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
        objective = method.layer_objective(cfg.distill, student.config, teacher.config, "task_distill")
        wrapper = StudentWithProjections(student, objective.projections)
        if "general_distill" in inputs:
            summary["projections_from_general"] = wrapper.load_projections(inputs["general_distill"].path / "model")
        outcome = train(
            TrainingJob(
                model=wrapper,
                train_features=train_set,
                collate=collate,
                compute_loss=layer_loss(teacher, objective, task.is_regression),
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
        settings = method.prediction_settings(cfg.distill, task.is_regression)
        logits = None
        if settings.hard_weight < 1.0:
            published = inputs["teacher_logits"]
            logits = TeacherLogits.load(published.path / published.summary["file"])
            missing = sum(int(i) not in logits.row_of for i in train_set["id"])
            if missing:
                raise PipelineError(f"task_distill: the teacher_logits entry {inputs['teacher_logits'].path} lacks {missing} of its {len(train_set)} training rows.")
            summary["teacher_logits"] = inputs["teacher_logits"].key
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
