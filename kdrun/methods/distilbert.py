"""DistilBERT (Sanh et al., 2019): the triple loss in general distillation, soft targets in task distillation.

General distillation: L = ce L_ce + mlm L_mlm + cos L_cos (``kdrun/distill/distilbert.py``) on
MLM-corrupted corpus sequences (``mlm_probability``, 80/10/10), with L_ce = T^2 KL(teacher || student)
of the masked-LM distributions at ``temperature`` over ``ce_positions`` (``all`` non-padding tokens, as
the released code, or the ``masked`` ones). The student is copied from every other teacher layer
(``student=distil_from_teacher``); the teacher's MLM head comes from a preceding fit_mlm_head stage
when there is one (the embedded MiniLM has none). Task distillation: soft cross-entropy on the task
logits at ``temperature``, times T^2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from kdrun.contract import user_errors
from kdrun.methods import LogitDistillConfig, Method

if TYPE_CHECKING:
    from kdrun.stages.context import StageContext


@dataclass
class TripleLossWeights:
    """The paper's weights of L_ce, L_mlm and L_cos; Table 4's rows set one to 0."""

    ce: float = 5.0
    mlm: float = 2.0
    cos: float = 1.0


@dataclass
class DistilBertConfig(LogitDistillConfig):
    name: str = "distilbert"
    weights: TripleLossWeights = field(default_factory=TripleLossWeights)
    temperature: float = 2.0
    scale_by_t2: bool = True
    ce_positions: str = "all"  # all | masked
    # The share of tokens corrupted for L_mlm (80% [MASK], 10% random, 10% kept).
    mlm_probability: float = 0.15


class DistilBert(Method):
    name = "distilbert"
    config = DistilBertConfig
    student_kinds = ("distilbert",)
    general_reads = ("name", "weights", "temperature", "ce_positions", "mlm_probability")
    reads_teacher_mlm = True

    def check(self, cfg: DictConfig, stage: str) -> None:
        super().check(cfg, stage)
        if stage != "general_distill":
            return
        from kdrun.models.distil_student import distilbert_config, teacher_layers_to_keep
        from kdrun.models.loading import load_checked_config

        _triple_loss_settings(cfg.distill)
        teacher_config = load_checked_config(cfg.teacher.path, cfg.teacher.revision)
        with user_errors("general_distill"):
            kept = teacher_layers_to_keep(teacher_config.num_hidden_layers, cfg.student.layers)
            distilbert_config(teacher_config, len(kept))  # the student copies BERT layers: a BERT teacher

    def general_setup(self, ctx: StageContext) -> Any:
        from transformers import DistilBertForMaskedLM

        from kdrun.data.mlm import MaskingCollator
        from kdrun.distill.distilbert import MaskedLmStudent, triple_loss
        from kdrun.distill.layers import GeneralSetup, frozen_teacher
        from kdrun.models.distil_student import distil_from_teacher, teacher_layers_to_keep
        from kdrun.models.masked_lm import load_masked_lm
        from kdrun.train import get_accelerator
        from kdrun.models.loading import model_saver

        cfg = ctx.cfg
        fitted = "fit_mlm_head" in ctx.inputs
        teacher_reference = str(ctx.model_dir("fit_mlm_head")) if fitted else cfg.teacher.path
        teacher, tokenizer = load_masked_lm(teacher_reference, None if fitted else cfg.teacher.revision)
        teacher.to(get_accelerator(cfg.device).device).eval().requires_grad_(False)
        student = distil_from_teacher(teacher, cfg.student.layers)  # from the fp32 weights
        teacher = frozen_teacher(teacher, cfg.device)
        if cfg.student.init == "random":  # Table 4's "random initialisation" row
            student = DistilBertForMaskedLM(student.config)

        return GeneralSetup(
            model=MaskedLmStudent(student),
            tokenizer=tokenizer,
            collate=MaskingCollator(tokenizer, cfg.distill.mlm_probability, cfg.general_distill.train.seed),
            compute_loss=triple_loss(teacher, _triple_loss_settings(cfg.distill)),
            save_model=model_saver(tokenizer, lambda model: model.mlm),
            parameters=sum(p.numel() for p in student.parameters()),
            summary={
                "teacher_mlm": teacher_reference,
                "student_layers": teacher_layers_to_keep(teacher.config.num_hidden_layers, cfg.student.layers),
                "init": cfg.student.init,
            },
        )


def _triple_loss_settings(distill: DictConfig) -> Any:
    from kdrun.distill.distilbert import TripleLossSettings

    w = distill.weights
    with user_errors("general_distill"):
        return TripleLossSettings(ce=w.ce, mlm=w.mlm, cos=w.cos, temperature=distill.temperature, ce_positions=distill.ce_positions)


METHOD = DistilBert()
