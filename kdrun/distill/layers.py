"""Training-time wiring shared by the methods that distil intermediate layers (TinyBERT, MiniLM).

A method gives a *layer objective* (:class:`LayerObjective`): what to capture from each model
(``capture_request``, the keyword arguments of ``kdrun.models.capture.forward_with_capture``), the
loss over the two captures, and the learnt maps that train with the student (``projections``, or
None). Everything else, the teacher run under inference mode, the student wrapper that DDP and the
checkpoints see, and general distillation's job on the corpus, is here, so a new layer method is its
objective alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdrun.contract import PipelineError, user_errors
from kdrun.models.capture import CapturedOutputs, forward_with_capture
from kdrun.models.inputs import forward_inputs
from kdrun.precision import default_attention_kernels
from kdrun.predict import model_inputs

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from kdrun.methods import Method

PROJECTIONS_FILE = "projections.safetensors"
ComputeLoss = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


class LayerObjective(Protocol):
    """A loss over captured internals of student and teacher (``kdrun.distill.losses.TinyBertObjective``,
    ``kdrun.methods.minilm.MiniLmObjective``)."""

    projections: nn.Module | None

    def capture_request(self, student: bool) -> dict[str, Any]: ...

    def __call__(
        self, student_out: CapturedOutputs, teacher_out: CapturedOutputs, key_padding_mask: torch.Tensor | None, is_regression: bool
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


class StudentWithProjections(nn.Module):
    """The student plus the learnable maps its objective trains with it (TinyBERT's W_h; none for MiniLM).

    Both train together, so they are one module for the optimizer, DDP and checkpoints;
    the student's forward runs inside this module's forward so that DDP sees it.
    """

    def __init__(self, student: nn.Module, projections: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.projections = projections if projections is not None else nn.Identity()  # no parameters

    def forward(self, inputs: Mapping[str, torch.Tensor], request: Mapping[str, Any] | None = None, labels: torch.Tensor | None = None) -> Any:
        if request is None:
            return self.student(**forward_inputs(self.student, inputs), labels=labels)
        return forward_with_capture(self.student, dict(inputs), **request)

    def save_projections(self, directory: Path) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in self.projections.state_dict().items()}
        if state:
            save_file(state, str(directory / PROJECTIONS_FILE))

    def load_projections(self, directory: Path) -> bool:
        """Continue with the maps learnt in general distillation when their shapes fit."""
        path = directory / PROJECTIONS_FILE
        if not path.is_file():
            return False
        state = load_file(str(path))
        own = self.projections.state_dict()
        if state.keys() != own.keys() or any(state[k].shape != own[k].shape for k in own):
            return False
        self.projections.load_state_dict(state)
        return True


def layer_loss(teacher: nn.Module, objective: LayerObjective, is_regression: bool) -> ComputeLoss:
    """``compute_loss`` for the training loop.

    The teacher runs under inference mode (and, like the student, under the training loop's autocast)
    and is asked only for what the objective reads. The prediction-layer step, which reads only logits,
    uses :mod:`kdrun.distill.prediction` and cached teacher logits instead.
    """
    teacher_request = objective.capture_request(student=False)
    student_request = objective.capture_request(student=True)

    def compute_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = model_inputs(batch)
        with torch.inference_mode(), default_attention_kernels():
            teacher_out = forward_with_capture(teacher, inputs, **teacher_request)
        student_out = model(inputs, student_request)
        return objective(student_out, teacher_out, batch["attention_mask"], is_regression)

    return compute_loss


@dataclass
class GeneralSetup:
    """General distillation's job as a method builds it; the stage adds the corpus and trains."""

    model: nn.Module
    tokenizer: Any
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    compute_loss: ComputeLoss
    save_model: Callable[[nn.Module, Path], None]
    parameters: int
    summary: dict[str, Any] = field(default_factory=dict)


def frozen_teacher(teacher: nn.Module, device_cfg: Any) -> nn.Module:
    """The teacher as it runs frozen in the run's precision (weights in bf16 when that is the precision), on the run's device."""
    from kdrun.precision import resolve_precision
    from kdrun.train import get_accelerator

    teacher = resolve_precision(device_cfg).inference_model(teacher, copy=False)
    return teacher.to(get_accelerator(device_cfg).device).eval().requires_grad_(False)


def student_saver(tokenizer: Any) -> Callable[[StudentWithProjections, Path], None]:
    """A training job's ``save_model`` for a :class:`StudentWithProjections`: the student with its tokenizer,
    and the learnt projections beside it (general distillation's output, task distillation's steps)."""
    from kdrun.models.loading import model_saver

    return model_saver(tokenizer, lambda wrapper: wrapper.student, also=lambda wrapper, directory: wrapper.save_projections(directory))


def layer_general_setup(method: Method, cfg: DictConfig) -> GeneralSetup:
    """A randomly initialised BERT student learning ``method``'s layer objective from the pre-trained
    (not fine-tuned) teacher on packed corpus sequences. Its output, ``model/``, is a ``save_pretrained``
    encoder with the tokenizer and the learnt projections (if any)."""
    from transformers import AutoModel

    from kdrun.data.batching import PaddingCollator
    from kdrun.models.loading import load_tokenizer, resolve_model_path
    from kdrun.models.students import new_general_student

    tokenizer = load_tokenizer(cfg.teacher.path, cfg.teacher.revision)
    teacher = AutoModel.from_pretrained(resolve_model_path(cfg.teacher.path), revision=cfg.teacher.revision)
    teacher = frozen_teacher(teacher, cfg.device)
    student = new_general_student(cfg.student, teacher.config)
    objective = method.layer_objective(cfg.distill, student.config, teacher.config, "general_distill")

    return GeneralSetup(
        model=StudentWithProjections(student, objective.projections),
        tokenizer=tokenizer,
        collate=PaddingCollator(tokenizer),
        compute_loss=layer_loss(teacher, objective, is_regression=False),
        save_model=student_saver(tokenizer),
        parameters=sum(p.numel() for p in student.parameters()),
    )


def check_layer_method(method: Method, cfg: DictConfig, stage: str, weights_key: str) -> None:
    """Fail before any training when ``method``'s layer objective cannot run on this teacher and student:
    the objective must build (weights, mapping), layer capture (``kdrun.models.capture``) needs a BERT-style
    encoder (``embeddings`` and ``encoder.layer[i].attention.self``), which e.g. DistilBERT is not, and
    attention maps and value relations are compared head by head, so student and teacher need equal head
    counts. ``weights_key``: where the method's weights are set (for the message)."""
    from kdrun.models.loading import load_checked_config
    from kdrun.models.students import student_bert_config

    teacher_config = load_checked_config(cfg.teacher.path, cfg.teacher.revision)
    student_config = student_bert_config(cfg.student, teacher_config)
    with user_errors(stage):  # weights, mapping or attention target that cannot work
        objective = method.layer_objective(cfg.distill, student_config, teacher_config, stage)
    request = objective.capture_request(student=False)
    if request.get("attention_layers") or request.get("hidden_layers") or request.get("want_embeddings") or request.get("value_layers"):
        reason = _capture_unsupported(teacher_config)
        if reason is not None:
            raise PipelineError(
                f"The teacher at teacher.path={cfg.teacher.path} ({teacher_config.model_type}) cannot be distilled layer by "
                f"layer: {reason}. Use a BERT-architecture teacher, or distil its predictions only "
                "(task_distill.intermediate.enabled=false, without general_distill)."
            )
    student_heads, teacher_heads = student_config.num_attention_heads, teacher_config.num_attention_heads
    compared = [what for what, key in (("attention maps", "attention_layers"), ("value relations", "value_layers")) if request.get(key)]
    if compared and student_heads != teacher_heads:
        alternative = f", or {weights_key}.attention=0" if compared == ["attention maps"] else ""
        raise PipelineError(
            f"distill={method.name} compares {' and '.join(compared)} head by head, but student.num_attention_heads={student_heads} "
            f"and the teacher at teacher.path={cfg.teacher.path} has {teacher_heads} heads. Set "
            f"student.num_attention_heads={teacher_heads} (student.hidden_size must be a multiple of it){alternative}."
        )


def _capture_unsupported(teacher_config: Any) -> str | None:
    """Why layer capture cannot run on models of this config (None: it can), found by building the
    architecture on the meta device (no memory, no weights) and asking capture for its layers."""
    from transformers import AutoModel

    from kdrun.models.capture import unsupported_because

    with torch.device("meta"):
        model = AutoModel.from_config(teacher_config)
    return unsupported_because(model)
