"""The registry of distillation methods: what the distillation stages ask instead of branching on a name.

A method is one module in this package that defines ``METHOD``, an instance of a :class:`Method`
subclass. It brings:

- ``config``: its typed config node (a subclass of :class:`~kdrun.config.DistillConfig`) with its own
  weights, temperature and mapping; ``conf/distill/<name>.yaml`` names it in its defaults
  (``schema_<name>``, stored by ``kdrun.config.register_configs``);
- ``general_reads`` / ``task_reads``: the fields of that node that general and task distillation read,
  which is what their cache keys hash (so a task-only ablation reuses the general student);
- ``student_kinds``: the student kinds (``student.kind``) it can train;
- ``check``: what can be checked before any compute (weights, mapping, heads against the teacher);
- the torch side, imported only when a stage runs: ``layer_objective`` (what it captures from teacher and
  student and the loss over them, for task distillation's first step and, by default, general
  distillation), ``general_setup`` (the whole general-distillation job) and ``prediction_settings``
  (task distillation's second step).

Modules are found by listing this package (no list to edit); a method defined elsewhere joins with
:func:`register_method` (TextBrewer's ``register_new``, torchdistill's ``@register_*``). This package
imports no stage and no torch: planning and config validation use it.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from omegaconf import DictConfig

from kdrun.config import DistillConfig
from kdrun.contract import PipelineError, user_errors

if TYPE_CHECKING:
    from kdrun.stages.context import StageContext

PREDICTION_TARGETS = ("teacher", "labels")


@dataclass
class LogitDistillConfig(DistillConfig):
    """Task distillation's prediction step, which every method has: the student learns the fine-tuned
    teacher's logits (soft cross-entropy at ``temperature``, times T^2 if ``scale_by_t2``) or, with
    ``prediction_target=labels``, the gold labels alone (TinyBERT's "w/o Pred"). For a regression task
    (STS-B): ``regression_target`` ``teacher`` (MSE to the teacher's score) or ``labels`` (the gold score,
    which augmented rows copy from their source)."""

    temperature: float = 1.0
    scale_by_t2: bool = False
    prediction_target: str = "teacher"
    regression_target: str = "teacher"


LOGIT_FIELDS = ("name", "temperature", "scale_by_t2", "prediction_target", "regression_target")


class Method:
    """One distillation method; subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    config: ClassVar[type[DistillConfig]]
    student_kinds: ClassVar[tuple[str, ...]]
    # Fields of ``distill`` that general distillation reads; () means the method has no general distillation.
    general_reads: ClassVar[tuple[str, ...]] = ()
    # Fields of ``distill`` that task distillation reads (both steps).
    task_reads: ClassVar[tuple[str, ...]] = LOGIT_FIELDS
    # Whether task distillation's first step (intermediate layers) exists for this method.
    has_layer_step: ClassVar[bool] = False
    # Whether general distillation reads the teacher's masked-LM head (a preceding fit_mlm_head stage fits one).
    reads_teacher_mlm: ClassVar[bool] = False

    # ------------------------------------------------------------------ planning (no torch)

    def labels_weight(self, distill: DictConfig, is_regression: bool) -> float:
        """The weight a of the gold labels in the prediction step (1: labels only, no teacher logits)."""
        if distill.prediction_target == "labels" or (is_regression and distill.regression_target == "labels"):
            return 1.0
        return 0.0

    def check(self, cfg: DictConfig, stage: str) -> None:
        """Raise :class:`PipelineError` for settings that cannot work in ``stage`` (``general_distill`` or
        ``task_distill``), before any compute; may read model configs (no weights)."""
        kind = cfg.student.kind
        if kind not in self.student_kinds:
            raise PipelineError(
                f"distill={self.name} trains a student of kind {' or '.join(self.student_kinds)}, "
                f"not student={cfg.student.name} (kind {kind})."
            )
        if stage == "general_distill" and not self.general_reads:
            raise PipelineError(f"distill={self.name} has no general distillation: remove general_distill from pipeline.stages.")
        for name in ("prediction_target", "regression_target"):
            if cfg.distill[name] not in PREDICTION_TARGETS:
                raise PipelineError(f"distill.{name} must be one of {PREDICTION_TARGETS}, got '{cfg.distill[name]}'.")
        if stage == "task_distill" and cfg.task_distill.intermediate.enabled and not self.has_layer_step:
            raise PipelineError(
                f"distill={self.name} has no intermediate-layer step in task distillation; "
                "set task_distill.intermediate.enabled=false."
            )

    # ------------------------------------------------------------------ compute (imports torch)

    def prediction_settings(self, distill: DictConfig, is_regression: bool) -> Any:
        """Task distillation's second step: a :class:`kdrun.distill.prediction.PredictionLossSettings`."""
        from kdrun.distill.prediction import PredictionLossSettings

        with user_errors("task_distill"):
            return PredictionLossSettings(
                kind="soft_ce", temperature=distill.temperature, scale_by_t2=distill.scale_by_t2,
                hard_weight=self.labels_weight(distill, is_regression),
            )

    def layer_objective(self, distill: DictConfig, student_config: Any, teacher_config: Any, stage: str) -> Any:
        """The intermediate-layer objective (``kdrun.distill.layers.LayerObjective``) for ``stage``."""
        raise NotImplementedError(f"distill={self.name} distils no intermediate layers")

    def general_setup(self, ctx: StageContext) -> Any:
        """General distillation's job (``kdrun.distill.layers.GeneralSetup``) from the stage's context (its
        config view and inputs); by default a BERT student learning the method's layer objective from the
        pre-trained teacher."""
        from kdrun.distill.layers import layer_general_setup

        return layer_general_setup(self, ctx.cfg)


_METHODS: dict[str, Method] = {}
_DISCOVERED = False


def register_method(method: Method) -> Method:
    """Add a method defined outside this package (its module must be imported before configs compose)."""
    if not issubclass(method.config, DistillConfig):
        raise TypeError(f"{type(method).__name__}.config must subclass kdrun.config.DistillConfig")
    _METHODS[method.name] = method
    return method


def methods() -> dict[str, Method]:
    """Every method, by name: the modules of this package, then those registered from outside."""
    global _DISCOVERED
    if not _DISCOVERED:
        _DISCOVERED = True
        for module in pkgutil.iter_modules(__path__):
            found = getattr(importlib.import_module(f"{__name__}.{module.name}"), "METHOD", None)
            if found is not None:
                _METHODS.setdefault(found.name, found)
    return dict(_METHODS)


def method_named(name: str) -> Method:
    known = methods()
    if name not in known:
        raise PipelineError(f"distill={name} is not a distillation method; known: {sorted(known)}.")
    return known[name]


def method_of(cfg: DictConfig) -> Method:
    """The method a (composed) config selects with ``distill``."""
    return method_named(cfg.distill.name)
