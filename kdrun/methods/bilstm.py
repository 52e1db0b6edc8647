"""Tang et al. (2019): the student learns the fine-tuned teacher's logits alone.

L = a CE(gold labels) + (1 - a) MSE(teacher logits, student logits), a = ``weights.hard`` (0, the
paper's best); ``prediction_loss=soft_ce`` uses soft cross-entropy instead of MSE. Made for the BiLSTM
student, but any student with a task head can learn logits. No general distillation and no
intermediate-layer step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from kdrun.contract import user_errors
from kdrun.methods import LOGIT_FIELDS, LogitDistillConfig, Method


@dataclass
class LogitWeights:
    # a: the weight of the gold labels' cross-entropy beside the distillation term.
    hard: float = 0.0


@dataclass
class TangConfig(LogitDistillConfig):
    name: str = "bilstm"
    weights: LogitWeights = field(default_factory=LogitWeights)
    prediction_loss: str = "mse"  # mse | soft_ce


class TangLogits(Method):
    name = "bilstm"
    config = TangConfig
    student_kinds = ("bilstm", "bert", "distilbert")
    task_reads = (*LOGIT_FIELDS, "weights", "prediction_loss")

    def labels_weight(self, distill: DictConfig, is_regression: bool) -> float:
        return max(super().labels_weight(distill, is_regression), float(distill.weights.hard))

    def prediction_settings(self, distill: DictConfig, is_regression: bool) -> Any:
        from kdrun.distill.prediction import PredictionLossSettings

        with user_errors("task_distill"):
            return PredictionLossSettings(
                kind=distill.prediction_loss, temperature=distill.temperature, scale_by_t2=distill.scale_by_t2,
                hard_weight=self.labels_weight(distill, is_regression),
            )


METHOD = TangLogits()
