"""The prediction-layer loss of task distillation, for every recipe.

L = a * L_hard + (1 - a) * L_distill, where L_hard is the task loss on the gold
labels (cross-entropy, or MSE for regression) and L_distill compares the
student's logits with the teacher's, which are looked up by example id:

* ``soft_ce`` (TinyBERT step 2, DistilBERT): soft cross-entropy at temperature T,
  optionally times T^2;
* ``mse`` (Tang et al., 2019): mean squared error between the logits, which the
  paper found better than soft cross-entropy for its BiLSTM; a = 0 is its best.

Regression tasks (STS-B) always use MSE on the single output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.distill.losses import logit_mse, soft_cross_entropy
from kdrun.predict import model_inputs

PREDICTION_LOSSES = ("soft_ce", "mse")


@dataclass(frozen=True)
class PredictionLossSettings:
    kind: str = "soft_ce"
    temperature: float = 1.0
    scale_by_t2: bool = False
    hard_weight: float = 0.0  # a

    def __post_init__(self) -> None:
        if self.kind not in PREDICTION_LOSSES:
            raise ValueError(f"distill.prediction_loss must be one of {PREDICTION_LOSSES}, got {self.kind!r}")
        if not 0.0 <= self.hard_weight <= 1.0:
            raise ValueError(f"distill.weights.hard (a) must be in [0, 1], got {self.hard_weight}")
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature must be positive, got {self.temperature}")


def hard_label_loss(logits: Tensor, labels: Tensor, is_regression: bool) -> Tensor:
    if is_regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def distillation_term(student_logits: Tensor, teacher_logits: Tensor, settings: PredictionLossSettings, is_regression: bool) -> Tensor:
    if is_regression or settings.kind == "mse":
        return logit_mse(student_logits.float(), teacher_logits)
    return soft_cross_entropy(student_logits.float(), teacher_logits, settings.temperature, settings.scale_by_t2)


def prediction_loss(
    settings: PredictionLossSettings,
    is_regression: bool,
    teacher_logits: Callable[[Tensor], Tensor] | None,
) -> Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, dict[str, float]]]:
    """``compute_loss`` for the training loop; ``teacher_logits`` maps example ids to logits (None: a = 1)."""
    if teacher_logits is None and settings.hard_weight < 1.0:
        raise ValueError("distilling the prediction layer needs the teacher's logits (or distill.weights.hard=1)")

    def compute_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        logits = model(model_inputs(batch)).logits
        a = settings.hard_weight
        total = logits.new_zeros((), dtype=torch.float32)
        parts: dict[str, float] = {}
        if a < 1.0:
            distill = distillation_term(logits, teacher_logits(batch["example_id"]), settings, is_regression)
            total, parts["distill"] = total + (1.0 - a) * distill, float(distill.detach())
        if a > 0.0:
            hard = hard_label_loss(logits, batch["labels"], is_regression)
            total, parts["hard"] = total + a * hard, float(hard.detach())
        return total, parts

    return compute_loss
