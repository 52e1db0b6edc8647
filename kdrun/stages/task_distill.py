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

from typing import Any

from omegaconf import DictConfig

from kdrun.contract import PipelineError
from kdrun.distill.layers import StudentWithProjections, layer_loss, student_saver
from kdrun.distill.prediction import prediction_loss
from kdrun.distill.teacher_logits import TeacherLogits
from kdrun.methods import method_of
from kdrun.models.loading import load_checked_config, load_for_sequence_classification, load_model_config, load_tokenizer
from kdrun.models.students import bilstm_student_for_task, distil_student_for_task, student_for_task
from kdrun.precision import resolve_precision
from kdrun.predict import main_metric_key
from kdrun.stages import needs_teacher, needs_teacher_logits
from kdrun.stages.context import StageContext, check_data_available, task_of
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
    method.prediction_settings(cfg.distill, task_of(cfg).is_regression)
    load_checked_config(cfg.teacher.path, cfg.teacher.revision)  # its weights and tokenizer, before compute
    check_data_available(cfg)


def _student(ctx: StageContext, teacher_config, teacher_tokenizer, train_examples):
    """(student with a task head, its tokenizer, where it started from)."""
    cfg, task = ctx.cfg, ctx.task
    general = ctx.inputs.get("general_distill")
    kind = cfg.student.kind
    if kind == "bilstm":
        texts = [t for column in ("text_a", "text_b") for t in train_examples[column] if t]
        student, tokenizer, coverage = bilstm_student_for_task(cfg.student, task, texts, cfg.data.max_seq_length)
        return student, tokenizer, {"init": f"new, embeddings {cfg.student.embeddings}", **coverage}
    if kind == "distilbert":
        init_from = ctx.model_dir("general_distill") if general is not None else None
        student = distil_student_for_task(cfg.student, task, init_from, cfg.teacher.path)
        return student, teacher_tokenizer, {"init": str(init_from or f"teacher layers ({cfg.student.init})")}
    init_from = ctx.model_dir("general_distill") if general is not None else cfg.student.init
    return student_for_task(cfg.student, teacher_config, task, init_from), teacher_tokenizer, {"init": str(init_from)}


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, inputs, out_dir, task = ctx.cfg, ctx.inputs, ctx.out_dir, ctx.task
    method = method_of(cfg)
    accelerator = get_accelerator(cfg.device)
    teacher = None
    if cfg.task_distill.intermediate.enabled:  # step 1 runs the fine-tuned teacher (step 2 reads teacher_logits)
        teacher, teacher_tokenizer = load_for_sequence_classification(str(ctx.model_dir("finetune_teacher")), task)
        teacher = resolve_precision(cfg.device).inference_model(teacher, copy=False)  # frozen: weights in the run's precision
        teacher.to(accelerator.device).eval().requires_grad_(False)
        teacher_config = teacher.config
    else:  # only the teacher's shape and tokenizer (the fine-tuned one's when it ran; labels only, e.g. w/o TD: the pre-trained one's)
        fitted = "finetune_teacher" in inputs
        path, revision = (str(ctx.model_dir("finetune_teacher")), None) if fitted else (cfg.teacher.path, cfg.teacher.revision)
        teacher_tokenizer = load_tokenizer(path, revision)
        teacher_config = load_model_config(path, revision)
    train_examples = ctx.distillation_rows()
    seed_everything(cfg.task_distill.intermediate.train.seed)
    student, tokenizer, summary = _student(ctx, teacher_config, teacher_tokenizer, train_examples)
    text = ctx.text(tokenizer)
    train_set = text.features(train_examples)
    summary = {"model_dir": "model", "train_examples": len(train_set), **summary}
    save_student = student_saver(tokenizer)

    if cfg.task_distill.intermediate.enabled:
        objective = method.layer_objective(cfg.distill, student.config, teacher.config, "task_distill")
        wrapper = StudentWithProjections(student, objective.projections)
        if "general_distill" in inputs:
            summary["projections_from_general"] = wrapper.load_projections(ctx.model_dir("general_distill"))
        outcome = train(
            TrainingJob(
                model=wrapper,
                train_features=train_set,
                collate=text.collate,
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
                collate=text.collate,
                compute_loss=prediction_loss(settings, task.is_regression, logits),
                save_model=save_student,
                evaluate=text.evaluator(cfg.task_distill.prediction.train.eval_batch_size, lambda wrapper: wrapper.student),
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
