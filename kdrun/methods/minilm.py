"""MiniLM (Wang et al., 2020): deep self-attention distillation of the last Transformer layer.

The student mimics two relations of the teacher's last layer, head by head:

- the self-attention distributions A = softmax(Q K^T / sqrt(d_k));
- the value relation VR = softmax(V V^T / sqrt(d_k)), the scaled dot products of the values;

each by KL(teacher || student) of every row (query position), averaged over the heads and the real
(non-padding) query positions of an example, then over the examples:
L = ``weights.attention`` L_AT + ``weights.value_relation`` L_VR. Padded keys get no probability in
either model. Both relations are sequence x sequence per head, so the student's width (and head size
d_k, each model scaling by its own) is free and nothing is projected; the head counts must be equal
(MiniLM v1 compares head by head; a mismatch is refused before any compute). The last layers are
compared whatever the depths, so no layer mapping either.

General distillation learns the relations from the pre-trained teacher on the corpus; task
distillation's first step from the fine-tuned teacher on the task data, its second step the logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from kdrun.methods import LOGIT_FIELDS, LogitDistillConfig, Method

if TYPE_CHECKING:
    from torch import Tensor

    from kdrun.models.capture import CapturedOutputs

# Added to the logits of padded keys: exp() of it is 0 in fp32, yet it stays finite, so that
# 0 * (log p_t - log p_s) is 0 and not nan.
_PADDING_LOGIT = -1.0e9


@dataclass
class MiniLmWeights:
    """The weights of L_AT and L_VR; the paper adds them unweighted."""

    attention: float = 1.0
    value_relation: float = 1.0


@dataclass
class MiniLmConfig(LogitDistillConfig):
    name: str = "minilm"
    # Both stages' layer step (general distillation, and task distillation's first step).
    weights: MiniLmWeights = field(default_factory=MiniLmWeights)


def relation_kl(teacher_logits: Tensor, student_logits: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """KL(softmax(teacher) || softmax(student)) of every row of [batch, heads, query, key] logits, averaged
    over heads and real query positions per example, then over examples. ``key_padding_mask``: [batch, key],
    0 at padding (masks keys and excludes padded query rows)."""
    import torch.nn.functional as F

    from kdrun.distill.losses import _usable

    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"MiniLM compares relations head by head: teacher {tuple(teacher_logits.shape)} and student "
            f"{tuple(student_logits.shape)} differ (equal head counts are needed)"
        )
    teacher, student = _usable(teacher_logits), student_logits.float()
    if key_padding_mask is not None:
        padded = (key_padding_mask == 0)[:, None, None, :].to(student.device)
        teacher, student = teacher.masked_fill(padded, _PADDING_LOGIT), student.masked_fill(padded, _PADDING_LOGIT)
    teacher_log, student_log = F.log_softmax(teacher, dim=-1), F.log_softmax(student, dim=-1)
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(dim=-1)  # [batch, heads, query]
    if key_padding_mask is None:
        return kl.mean(dim=(1, 2)).mean()
    real = key_padding_mask.to(kl.dtype)[:, None, :]
    per_example = (kl * real).sum(dim=(1, 2)) / (kl.shape[1] * real.sum(dim=(1, 2)))
    return per_example.mean()


def value_relation_logits(values: Tensor) -> Tensor:
    """V V^T / sqrt(d_k) per head, from values [batch, heads, key, head size]: the logits of VR."""
    values = values.float()
    return values @ values.transpose(-1, -2) / values.shape[-1] ** 0.5


class MiniLmObjective:
    """The MiniLM loss over the captured last layers (``kdrun.distill.layers.LayerObjective``)."""

    projections = None  # the student's width is free: nothing to learn beside it

    def __init__(self, attention: float, value_relation: float, student_layers: int, teacher_layers: int):
        if min(attention, value_relation) < 0 or attention + value_relation == 0:
            raise ValueError(f"distill.weights must be >= 0 and not both 0, got attention={attention}, value_relation={value_relation}")
        self.attention, self.value_relation = attention, value_relation
        self.student_layer, self.teacher_layer = student_layers, teacher_layers

    def capture_request(self, student: bool) -> dict[str, Any]:
        layer = {self.student_layer if student else self.teacher_layer}
        return {
            "attention_layers": layer if self.attention > 0 else set(),
            "hidden_layers": set(),
            "want_embeddings": False,
            "want_logits": False,
            "attention_target": "scores",  # the logits of A; the loss masks padded keys itself
            "value_layers": layer if self.value_relation > 0 else set(),
        }

    def __call__(
        self, student_out: CapturedOutputs, teacher_out: CapturedOutputs, key_padding_mask: Tensor | None, is_regression: bool
    ) -> tuple[Tensor, dict[str, float]]:
        s, t = self.student_layer, self.teacher_layer
        terms: dict[str, Tensor] = {}
        if self.attention > 0:
            terms["attention"] = relation_kl(teacher_out.attention_scores[t], student_out.attention_scores[s], key_padding_mask)
        if self.value_relation > 0:
            terms["value_relation"] = relation_kl(
                value_relation_logits(teacher_out.values[t]), value_relation_logits(student_out.values[s]), key_padding_mask
            )
        total = self.attention * terms.get("attention", 0.0) + self.value_relation * terms.get("value_relation", 0.0)
        report = {name: float(value.detach()) for name, value in terms.items()}
        report["total"] = float(total.detach())
        return total, report


class MiniLm(Method):
    name = "minilm"
    config = MiniLmConfig
    student_kinds = ("bert",)
    general_reads = ("name", "weights")
    task_reads = (*LOGIT_FIELDS, "weights")
    has_layer_step = True

    def check(self, cfg: DictConfig, stage: str) -> None:
        super().check(cfg, stage)
        if stage == "general_distill" or cfg.task_distill.intermediate.enabled:
            from kdrun.distill.layers import check_layer_method

            check_layer_method(self, cfg, stage, "distill.weights")

    def layer_objective(self, distill: DictConfig, student_config: Any, teacher_config: Any, stage: str) -> MiniLmObjective:
        return MiniLmObjective(
            float(distill.weights.attention), float(distill.weights.value_relation),
            student_config.num_hidden_layers, teacher_config.num_hidden_layers,
        )


METHOD = MiniLm()
