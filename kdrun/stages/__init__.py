"""The stage table: every built-in stage's contract (what it reads, needs and makes), one module of code each.

This module imports no stage module and no torch: it names each stage's ``run`` and ``check`` as
``module:function`` (:class:`~kdrun.contract.Lazy`), imported only when the stage runs, so planning
(every cache key) is config logic alone. Stage modules import neither this table's neighbours nor
the pipeline: what two stages share lives outside ``kdrun/stages`` (``kdrun.distill``,
``kdrun.augment.shards``, ``kdrun.quant.sensitivity``) or in ``context``, which is no stage: the
:class:`~kdrun.stages.context.StageContext` every ``run`` is handed, with the task's rows, tokenising, dev
scoring, saving and error wrapping that all stages share.

``reads`` are keyed: a stage's cache key hashes exactly these config paths, its sources' content and
its inputs' keys, and its ``run`` sees nothing else (``kdrun.contract.stage_view``). The distillation
stages read their method's fields (``kdrun.methods``) and their student kind's.
"""

from __future__ import annotations

from omegaconf import DictConfig

from kdrun.contract import Lazy, Stage
from kdrun.data.tasks import get_task
from kdrun.methods import method_of

TASK_DATA = ("task", "data.max_seq_length", "data.max_train_examples", "data.max_eval_examples", "data.sample_seed")


def _code(name: str) -> dict[str, Lazy]:
    return {"run": Lazy(f"kdrun.stages.{name}:run"), "check": Lazy(f"kdrun.stages.{name}:check")}


def student_reads(cfg: DictConfig) -> tuple[str, ...]:
    """Every field of the student's node but its name (two names for one shape make one student)."""
    return tuple(f"student.{key}" for key in cfg.student if key != "name")


def needs_teacher_logits(cfg: DictConfig) -> bool:
    """Whether task distillation's prediction step learns the teacher's logits (not the gold labels alone)."""
    is_regression = get_task(cfg.task.name).is_regression
    return cfg.task_distill.prediction.enabled and method_of(cfg).labels_weight(cfg.distill, is_regression) < 1.0


def needs_teacher(cfg: DictConfig) -> bool:
    """Whether task distillation reads the fine-tuned teacher (bilstm_nokd trains on gold labels alone)."""
    return cfg.task_distill.intermediate.enabled or needs_teacher_logits(cfg)


def _task_distill_wants(cfg: DictConfig, name: str) -> bool:
    if name == "finetune_teacher":
        return needs_teacher(cfg)
    if name == "teacher_logits":
        return needs_teacher_logits(cfg)
    return True


def _general_reads(cfg: DictConfig) -> tuple[str, ...]:
    method = method_of(cfg)
    return ("teacher.revision", *student_reads(cfg), *(f"distill.{f}" for f in method.general_reads), "general_distill")


def _task_reads(cfg: DictConfig) -> tuple[str, ...]:
    return (*TASK_DATA, *student_reads(cfg), *(f"distill.{f}" for f in method_of(cfg).task_reads), "task_distill")


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            name="finetune_teacher",
            **_code("finetune_teacher"),
            version="2",  # 2: a checkpoint predicting one class for a whole dev split is never kept as the best
            reads=(*TASK_DATA, "teacher.revision", "finetune_teacher"),
            sources=("glue", "teacher"),
            produces_model=True,
        ),
        Stage(
            name="fit_mlm_head",
            **_code("fit_mlm_head"),
            reads=("teacher.revision", "fit_mlm_head"),
            sources=("teacher", "corpus"),
        ),
        Stage(
            name="general_distill",
            **_code("general_distill"),
            # 3: the method's own config node is keyed (no other method's weights); 2: fit_dense is learnt at
            # equal widths too (TinyBERT-6), as in the official code
            version="3",
            reads=_general_reads,
            sources=("teacher", "corpus", "student.init"),
            uses=("fit_mlm_head",),
            wants=lambda cfg, name: method_of(cfg).reads_teacher_mlm,
        ),
        Stage(
            name="augment",
            **_code("augment"),
            version="2",  # 2: TinyBERT's stop words are the official code's; Tang's duplicate copies are discarded
            reads=("task", "data.max_train_examples", "data.sample_seed", "augment"),
            sources=("glue", "augment.glove", "augment.mlm_model", "spacy"),
            # The GloVe neighbour table is kept under the cache directory, keyed by the vectors' name and k.
            unkeyed=("cache.dir",),
            uses=("fit_mlm_head",),
            wants=lambda cfg, name: cfg.augment.name == "tinybert" and cfg.augment.mlm_model is None,
            uses_precision=lambda cfg: cfg.augment.name == "tinybert",  # its masked LM runs in the run's precision
        ),
        Stage(
            name="teacher_logits",
            **_code("teacher_logits"),
            reads=("task", "data.max_seq_length", "data.max_train_examples", "data.sample_seed"),
            sources=("glue",),
            requires=("finetune_teacher",),
            uses=("augment",),
            # Inference batches are length-sorted and padded per batch; their size changes no row's logits
            # beyond rounding, and one table serves every student whatever its training batch settings.
            unkeyed=("task_distill.prediction.train.eval_batch_size",),
        ),
        Stage(
            name="task_distill",
            **_code("task_distill"),
            # 5: the teacher's logits come from the teacher_logits stage; 4: the method's and student kind's own
            # config nodes are keyed; 3: fit_dense learnt at equal widths;
            # 2: a constant predictor is never kept as the best
            version="5",
            reads=_task_reads,
            # The teacher's directory too: its tokenizer and shape make the student when no fine-tuned teacher runs.
            sources=("glue", "teacher", "student.init", "student.glove"),
            uses=("finetune_teacher", "general_distill", "augment", "teacher_logits"),
            wants=_task_distill_wants,
            produces_model=True,
        ),
        Stage(
            name="sensitivity",
            run=Lazy("kdrun.stages.sensitivity:run"),
            version="2",  # 2: |mean| + std of the top eigenvalue (a negative one ranked as the least sensitive)
            reads=("task", "data.max_seq_length", "data.max_train_examples", "data.sample_seed", "quantize.hessian"),
            sources=("glue",),
            consumes_model=True,
            uses_precision=False,  # Hessian power iteration stays fp32
        ),
        Stage(
            name="quantize",
            **_code("quantize"),
            version="3",  # 3: weight groups of attention matrices never span two heads; 2: a one-class checkpoint is never kept as the best
            reads=(*TASK_DATA, "quantize"),
            sources=("glue",),
            uses=("sensitivity",),
            wants=lambda cfg, name: name != "sensitivity" or cfg.quantize.name == "qbert_mp",
            consumes_model=True,
            produces_model=True,
            uses_precision=False,  # fp32 always (see kdrun/stages/quantize.py)
        ),
        Stage(
            name="evaluate",
            **_code("evaluate"),
            reads=("task", "data.max_seq_length", "data.max_eval_examples", "data.sample_seed", "evaluate"),
            sources=("glue",),
            consumes_model=True,
            cached=False,
        ),
        Stage(
            name="export",
            run=Lazy("kdrun.stages.export:run"),
            check=Lazy("kdrun.stages.export:check"),
            version="1",
            reads=(
                "task", "data.max_seq_length", "data.max_eval_examples", "data.sample_seed", "export",
                "evaluate.batch_size", "evaluate.latency_batch_sizes", "evaluate.latency_seq_length",
                "evaluate.latency_warmup", "evaluate.latency_repeats", "evaluate.measure_latency", "device.threads",
                # The model card describes the run that made the model (kdrun/export/card.py): keyed, so that a
                # hit never ships another run's description.
                "experiment_name", "ablation", "scale", "teacher.path", "teacher.revision",
                "student.name", "distill.name", "augment.name", "quantize.name", "data.max_train_examples",
            ),
            # The card lists the run's stages too; the model it exports is keyed by the stages that made it
            # (its input's key), and an evaluate stage more or less changes nothing the export computes.
            unkeyed=("pipeline.stages",),
            sources=("glue",),
            consumes_model=True,
            uses_precision=False,  # every format is measured in its own precision
        ),
        Stage(
            name="import_model",
            run=Lazy("kdrun.stages.export:run_import"),
            check=Lazy("kdrun.stages.export:check_import"),
            reads=(),
            sources=("export.model",),  # keyed by the directory's content, not its path
            produces_model=True,
            uses_precision=False,
        ),
    )
}
