"""DistilBERT's triple loss (Sanh et al., 2019): L = a_ce L_ce + a_mlm L_mlm + a_cos L_cos.

* ``L_ce``: the teacher's masked-LM distribution as a soft target,
  T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), averaged over the token
  positions it is computed at (all non-padding positions, as the released
  training code does by default, or only the masked ones);
* ``L_mlm``: the student's own masked-LM cross-entropy on the 15% corrupted tokens;
* ``L_cos``: 1 - cos(h_s, h_t) between the last hidden states, averaged over
  non-padding positions (aligns the directions of the two representations).

Both models read the same corrupted input. The vocabulary projection is run only
at the positions a term reads: on short corpus sequences it costs more than
the student's encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.models.masked_lm import masked_lm_logits
from kdrun.precision import default_attention_kernels

CE_POSITIONS = ("all", "masked")


@dataclass(frozen=True)
class TripleLossSettings:
    """Weights of the three terms (the paper's 5, 2, 1), the temperature, and where L_ce is computed."""

    ce: float = 5.0
    mlm: float = 2.0
    cos: float = 1.0
    temperature: float = 2.0
    ce_positions: str = "all"

    def __post_init__(self) -> None:
        if self.ce_positions not in CE_POSITIONS:
            raise ValueError(f"distill.ce_positions must be one of {CE_POSITIONS}, got {self.ce_positions!r}")
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature must be positive, got {self.temperature}")
        if min(self.ce, self.mlm, self.cos) < 0 or self.ce + self.mlm + self.cos == 0:
            raise ValueError(f"the DistilBERT loss weights must be >= 0 and not all 0, got {self.ce}, {self.mlm}, {self.cos}")


def kl_soft_targets(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(p_t || p_s) with p = softmax(z / T), averaged over rows ("batchmean")."""
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum") / max(student_logits.shape[0], 1)
    return kl * temperature**2


def cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    """Mean of 1 - cos(h_s, h_t) over rows: torch's CosineEmbeddingLoss with target +1."""
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"L_cos needs the student and teacher widths to match, got {student_hidden.shape[-1]} and "
            f"{teacher_hidden.shape[-1]}; set distill.weights.cos=0 for a narrower student"
        )
    return (1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)).mean()


class MaskedLmStudent(nn.Module):
    """The student masked LM, returning hidden states and logits only at the rows a term reads.

    The loss calls this module (not the inner model's parts), so that under DDP the
    forward goes through the wrapper and gradients are synchronised.
    """

    def __init__(self, mlm: nn.Module):
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids: Tensor, attention_mask: Tensor, ce_rows: Tensor | None, mlm_rows: Tensor | None):
        hidden = self.mlm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        ce_logits = masked_lm_logits(self.mlm, hidden[ce_rows]) if ce_rows is not None else None
        mlm_logits = masked_lm_logits(self.mlm, hidden[mlm_rows]) if mlm_rows is not None else None
        return hidden, ce_logits, mlm_logits


def triple_loss(
    teacher: nn.Module,
    settings: TripleLossSettings,
) -> Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, dict[str, float]]]:
    """``compute_loss`` for a :class:`MaskedLmStudent` on MLM-corrupted batches (``labels`` -100 where not masked).

    ``teacher`` is a masked LM (``*ForMaskedLM``); it runs under inference mode and
    only as far as the active terms need.
    """

    def compute_loss(student: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        real = batch["attention_mask"].bool()
        masked = batch["labels"] != -100
        ce_rows = real if settings.ce_positions == "all" else masked
        teacher_hidden = teacher_logits = None
        if settings.ce > 0 or settings.cos > 0:
            with torch.inference_mode(), default_attention_kernels():  # autocast: the training loop's
                hidden = teacher.base_model(**inputs).last_hidden_state
                logits = masked_lm_logits(teacher, hidden[ce_rows]) if settings.ce > 0 else None
            teacher_hidden = hidden.clone()  # tensors made in inference mode cannot enter autograd
            teacher_logits = logits.clone() if logits is not None else None
        student_hidden, student_ce_logits, student_mlm_logits = student(
            batch["input_ids"], batch["attention_mask"],
            ce_rows if settings.ce > 0 else None, masked if settings.mlm > 0 else None,
        )
        total = student_hidden.new_zeros((), dtype=torch.float32)
        parts: dict[str, float] = {}
        if settings.ce > 0:
            ce = kl_soft_targets(student_ce_logits, teacher_logits, settings.temperature)
            total, parts["ce"] = total + settings.ce * ce, float(ce.detach())
        if settings.mlm > 0:
            if masked.any():
                mlm = F.cross_entropy(student_mlm_logits.float(), batch["labels"][masked])
            else:  # nothing masked in this batch: a zero that keeps the graph
                mlm = student_mlm_logits.sum() * 0.0
            total, parts["mlm"] = total + settings.mlm * mlm, float(mlm.detach())
        if settings.cos > 0:
            cos = cosine_loss(student_hidden[real], teacher_hidden[real])
            total, parts["cos"] = total + settings.cos * cos, float(cos.detach())
        return total, parts

    return compute_loss
