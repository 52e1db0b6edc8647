"""TinyBERT (Jiao et al., 2020): embedding, attention-score and hidden-state losses over mapped layers.

General distillation learns the layers from the pre-trained teacher with ``general_weights``; task
distillation's first step learns them from the fine-tuned teacher with ``weights`` (Table 3's term
ablations set both, so that "w/o Trm" also has a general student without Transformer-layer losses),
its second step the logits. Layers are mapped n = g(m) (``mapping``, ``kdrun/distill/mapping.py``);
a learnt ``fit_dense`` maps the student's width to the teacher's, as in the official code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig

from kdrun.methods import LOGIT_FIELDS, LogitDistillConfig, Method

TERMS = ("embedding", "attention", "hidden")


@dataclass
class TinyBertWeights:
    """Weight of each layer term; 0 removes the term and what only it captures."""

    embedding: float = 1.0
    attention: float = 1.0
    hidden: float = 1.0


@dataclass
class LayerMappingConfig:
    """n = g(m): ``uniform``, ``top``, ``bottom``, or ``list`` with one teacher layer per student layer."""

    kind: str = "uniform"
    layers: Optional[list[int]] = None


@dataclass
class TinyBertConfig(LogitDistillConfig):
    name: str = "tinybert"
    # Task distillation's intermediate step.
    weights: TinyBertWeights = field(default_factory=TinyBertWeights)
    # General distillation; apart from ``weights`` so that task-distillation ablations reuse one general student.
    general_weights: TinyBertWeights = field(default_factory=TinyBertWeights)
    # The attention loss on pre-softmax ``scores`` (TinyBERT) or post-softmax ``probs``.
    attention_target: str = "scores"
    mapping: LayerMappingConfig = field(default_factory=LayerMappingConfig)
    # STS-B: the official code's prediction step fits the gold scores (copied onto augmented rows), not the teacher's.
    regression_target: str = "labels"


class TinyBert(Method):
    name = "tinybert"
    config = TinyBertConfig
    student_kinds = ("bert",)
    general_reads = ("name", "attention_target", "mapping", "general_weights")
    task_reads = (*LOGIT_FIELDS, "weights", "attention_target", "mapping")
    has_layer_step = True

    def check(self, cfg: DictConfig, stage: str) -> None:
        super().check(cfg, stage)
        if stage == "general_distill" or cfg.task_distill.intermediate.enabled:
            from kdrun.distill.layers import check_layer_method

            check_layer_method(self, cfg, stage, "distill.general_weights" if stage == "general_distill" else "distill.weights")

    def layer_objective(self, distill: DictConfig, student_config: Any, teacher_config: Any, stage: str) -> Any:
        """TinyBERT's objective with the weights of ``stage``, and its always-learnt ``fit_dense`` (TinyBERT-6,
        as wide as its teacher, trains one too in the official code)."""
        from kdrun.distill.losses import ObjectiveConfig, TinyBertObjective, WidthProjections
        from kdrun.distill.mapping import LayerMapping

        weights = distill.general_weights if stage == "general_distill" else distill.weights
        projections = WidthProjections(
            student_config.hidden_size, teacher_config.hidden_size, student_config.num_hidden_layers, shared=True, always=True
        )
        config = ObjectiveConfig.from_mapping({
            "weights": {**{name: float(weights[name]) for name in TERMS}, "prediction": 0.0},  # logits: the second step's
            "attention_target": str(distill.attention_target),
            "mapping": LayerMapping(kind=str(distill.mapping.kind), layers=distill.mapping.layers),
        })
        return TinyBertObjective(config, student_config.num_hidden_layers, teacher_config.num_hidden_layers, projections)


METHOD = TinyBert()
