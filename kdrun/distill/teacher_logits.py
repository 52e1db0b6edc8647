"""The teacher's logits on a training set, computed once and looked up by example id.

Task distillation's prediction step and quantization-aware fine-tuning towards the full-precision
model both read them; neither is TinyBERT's.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import filelock
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdrun.fingerprint import sha256_of
from kdrun.precision import Precision
from kdrun.predict import predict_logits

logger = logging.getLogger(__name__)


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
