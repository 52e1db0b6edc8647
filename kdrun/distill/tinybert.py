"""Training-time wiring of the TinyBERT objective: what the optimizer trains, and the loss of a batch.

Shared by general distillation and both steps of task distillation so that the
three differ only in their data, weights and teacher.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import filelock
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdrun.distill.losses import ObjectiveConfig, TinyBertObjective, WidthProjections
from kdrun.distill.mapping import LayerMapping
from kdrun.fingerprint import sha256_of
from kdrun.models.inputs import forward_inputs
from kdrun.models.capture import forward_with_capture
from kdrun.precision import Precision, default_attention_kernels
from kdrun.predict import model_inputs, predict_logits

logger = logging.getLogger(__name__)

PROJECTIONS_FILE = "projections.safetensors"


class StudentWithProjections(nn.Module):
    """The student plus the learnable width maps W_h / W_e of the hidden and embedding losses.

    Both train together, so they are one module for the optimizer, DDP and checkpoints;
    the student's forward runs inside this module's forward so that DDP sees it.
    """

    def __init__(self, student: nn.Module, projections: WidthProjections | None = None):
        super().__init__()
        self.student = student
        self.projections = projections if projections is not None else WidthProjections(1, 1)  # identity, no parameters

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


def objective_from_config(
    distill: Any, weights: Mapping[str, float], student_config: Any, teacher_config: Any
) -> tuple[TinyBertObjective, WidthProjections]:
    """The objective for one training step (weights differ per step) and its width projections."""
    projections = WidthProjections(  # always a learnt fit_dense, as the official student has (TinyBERT-6 too)
        student_config.hidden_size, teacher_config.hidden_size, student_config.num_hidden_layers, shared=True, always=True
    )
    config = ObjectiveConfig.from_mapping(
        {
            # TinyBERT's four terms; the other recipes' weights (ce, mlm, cos, hard) are not its.
            "weights": {name: weights[name] for name in ("embedding", "attention", "hidden", "prediction") if name in weights},
            "temperature": float(distill.temperature),
            "scale_by_t2": bool(distill.scale_by_t2),
            "attention_target": str(distill.attention_target),
            "mapping": LayerMapping(kind=str(distill.mapping.kind), layers=distill.mapping.layers),
        }
    )
    objective = TinyBertObjective(
        config, student_config.num_hidden_layers, teacher_config.num_hidden_layers, projections
    )
    return objective, projections


def tinybert_loss(
    teacher: nn.Module,
    objective: TinyBertObjective,
    is_regression: bool,
) -> Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]:
    """``compute_loss`` for the training loop.

    The teacher runs under inference mode (and, like the student, under the
    training loop's autocast) and is asked only for what the active terms read (mapped layers' scores, hidden states, logits). The prediction-layer
    step, which reads only logits, uses :mod:`kdrun.distill.prediction` and cached
    teacher logits instead.
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


class TeacherLogits:
    """The teacher's logits on a training set, computed once and looked up by example id.

    Keyed by id, never by batch order, so shuffled, length-grouped or resumed
    batches always get their own example's logits.
    """

    def __init__(self, ids: torch.Tensor, logits: torch.Tensor):
        self.logits = logits
        self.row_of = {int(i): row for row, i in enumerate(ids.tolist())}
        if len(self.row_of) != len(ids):
            raise ValueError("example ids are not unique; teacher logits cannot be keyed by them.")

    def __call__(self, example_ids: torch.Tensor) -> torch.Tensor:
        rows = torch.tensor([self.row_of[int(i)] for i in example_ids.tolist()], dtype=torch.long)
        return self.logits[rows].to(example_ids.device)

    def save(self, path: Path) -> None:
        ids = torch.tensor(sorted(self.row_of, key=self.row_of.get), dtype=torch.long)
        save_file({"ids": ids, "logits": self.logits.contiguous()}, str(path))

    @classmethod
    def load(cls, path: Path) -> TeacherLogits:
        tensors = load_file(str(path))
        return cls(tensors["ids"], tensors["logits"])

    @classmethod
    def cached(
        cls, model: nn.Module, features: Any, collate: Any, batch_size: int, path: Path, precision: Precision | None = None
    ) -> TeacherLogits:
        """``model``'s logits on ``features`` (which need an ``id`` column), computed once (in ``precision``,
        which ``path`` must name) and kept at ``path``, so that a resumed run, or another run over the
        same rows, does not recompute them. A lock lets one of several parallel runs compute them while
        the others wait. ``<path>.sha256`` is written with the file and checked when it is reused: a
        damaged or incomplete file is moved aside and computed again."""
        reused = cls._verified(path, features)
        if reused is not None:
            return reused
        path.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(f"{path}.lock"):
            reused = cls._verified(path, features, locked=True)
            if reused is not None:
                return reused
            runnable = precision.inference_model(model) if precision is not None else model
            logits = predict_logits(runnable, features, collate, batch_size, description="teacher logits", precision=precision)
            table = cls(torch.tensor(features["id"]), torch.from_numpy(logits))
            partial = path.with_name(path.name + ".partial")
            table.save(partial)
            digest = path.with_name(path.name + ".sha256")
            digest.with_name(digest.name + ".partial").write_text(sha256_of(partial))
            os.replace(digest.with_name(digest.name + ".partial"), digest)
            os.replace(partial, path)
        return table

    @classmethod
    def _verified(cls, path: Path, features: Any, locked: bool = False) -> TeacherLogits | None:
        """The table at ``path`` when it is the file that was written and holds every row of ``features``."""
        if not path.is_file():
            return None
        digest = path.with_name(path.name + ".sha256")
        problem = None
        if not digest.is_file():
            problem = "it has no .sha256 beside it (written by an older kdrun)"
        elif sha256_of(path) != digest.read_text().strip():
            problem = "its SHA-256 differs from the one recorded when it was written"
        else:
            table = cls.load(path)
            missing = [i for i in features["id"] if int(i) not in table.row_of]
            if not missing:
                logger.info("teacher logits: reusing %s.", path)
                return table
            problem = f"it lacks {len(missing)} of the {len(features)} training rows"
        if locked:
            aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
            logger.warning("teacher logits: %s cannot be used (%s); moved it to %s and computing them again.", path, problem, aside)
        return None
