"""What the pipeline hands a stage's ``run``: one :class:`StageContext`, with the helpers every stage shares.

Before, each stage rebuilt the same closures: load the task's rows, tokenise them, make a padding
collator, score the dev splits, save a model with its tokenizer, turn a settings error into a
:class:`~kdrun.contract.PipelineError` (:func:`~kdrun.contract.user_errors`). They live here once, so that every stage that trains or
evaluates on the task sees the same samples of the same files, tokenised the same way, and a stage
is the code of its own job only.

- :class:`StageContext`: the stage's name, its view of the config (``kdrun.contract.stage_view``: only
  what its key hashes), its named inputs and its output directory; the task's rows (train, dev, test,
  the rows task distillation trains on).
- :class:`TaskText`: the task's rows through one tokenizer (``ctx.text(tokenizer)``): tokenised splits,
  the collator, and the ``evaluate`` callable a :class:`~kdrun.train.TrainingJob` takes (its ``save_model``
  is :func:`kdrun.models.loading.model_saver`, or :func:`kdrun.distill.layers.student_saver` for a student
  with projections).
- :func:`task_of` and :func:`check_data_available`: for a stage's ``check``, which runs before any
  compute and gets the config alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets
import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from kdrun.augment.shards import load_augmented
from kdrun.contract import MODEL_INPUT, StageOutput
from kdrun.data.batching import PaddingCollator, tokenize_examples
from kdrun.data.glue import load_glue_split, sample_examples
from kdrun.data.tasks import TaskSpec, get_task
from kdrun.metrics import Evaluation
from kdrun.precision import Precision
from kdrun.predict import score_dev_sets


def task_of(cfg: DictConfig) -> TaskSpec:
    return get_task(cfg.task.name)


def check_data_available(cfg: DictConfig) -> None:
    """Fail before any training when the task's training or dev data cannot be read (missing dir, no
    hub, a malformed or empty file): reading them is one TSV parse each, far cheaper than a stage
    that stops on them after the ones before it have computed."""
    task = task_of(cfg)
    for split in ("train", *task.eval_splits):
        load_glue_split(task, split, cfg.data.glue_dir)


def collator(tokenizer: PreTrainedTokenizerBase, task: TaskSpec) -> PaddingCollator:
    """Pads each batch to its longest row; float labels for a regression task."""
    return PaddingCollator(tokenizer, label_dtype=torch.float32 if task.is_regression else torch.long)


def _itself(module: torch.nn.Module) -> torch.nn.Module:
    return module


@dataclass
class StageContext:
    """One stage's run: its config view, named inputs and output directory, and the task's rows as its
    config samples them (``data.max_train_examples``, ``data.max_eval_examples``, ``data.sample_seed``)."""

    name: str
    cfg: DictConfig
    inputs: dict[str, StageOutput] = field(default_factory=dict)
    out_dir: Path = Path(".")
    _dev_examples: dict[str, datasets.Dataset] | None = field(default=None, init=False, repr=False)

    @cached_property
    def task(self) -> TaskSpec:
        return task_of(self.cfg)

    @property
    def model_input(self) -> StageOutput:
        """The output of the last model-producing stage before this one (a ``consumes_model`` stage)."""
        return self.inputs[MODEL_INPUT]

    def model_dir(self, name: str = MODEL_INPUT) -> Path:
        """The model directory an input stage published (``model/`` by convention)."""
        source = self.inputs[name]
        return source.path / source.summary.get("model_dir", "model")

    # ------------------------------------------------------------------ the task's rows

    def train_examples(self) -> datasets.Dataset:
        examples = load_glue_split(self.task, "train", self.cfg.data.glue_dir)
        return sample_examples(examples, self.cfg.data.max_train_examples, self.cfg.data.sample_seed)

    def dev_examples(self) -> dict[str, datasets.Dataset]:
        """Each dev split of the task (MNLI has matched and mismatched), sampled for CPU scale; read once."""
        if self._dev_examples is None:
            self._dev_examples = {
                split: sample_examples(load_glue_split(self.task, split, self.cfg.data.glue_dir), self.cfg.data.max_eval_examples, self.cfg.data.sample_seed)
                for split in self.task.eval_splits
            }
        return self._dev_examples

    def test_examples(self) -> dict[str, datasets.Dataset]:
        return {split: load_glue_split(self.task, split, self.cfg.data.glue_dir) for split in self.task.test_splits}

    def distillation_rows(self) -> datasets.Dataset:
        """The rows task distillation trains on (and teacher_logits labels): augment's output when that stage
        ran before, else the (sampled) training split."""
        augmented = load_augmented(self.inputs["augment"], self.task.is_regression) if "augment" in self.inputs else None
        return augmented if augmented is not None else self.train_examples()

    def text(self, tokenizer: PreTrainedTokenizerBase) -> TaskText:
        """The task's rows through ``tokenizer``."""
        return TaskText(self, tokenizer)


@dataclass
class TaskText:
    """A task's rows through one tokenizer, and the callables a training job on them takes."""

    context: StageContext
    tokenizer: PreTrainedTokenizerBase

    @cached_property
    def collate(self) -> PaddingCollator:
        return collator(self.tokenizer, self.context.task)

    def features(self, examples: datasets.Dataset) -> datasets.Dataset:
        """``examples`` tokenised to ``data.max_seq_length`` (with a ``length`` column for batching)."""
        return tokenize_examples(examples, self.tokenizer, self.context.cfg.data.max_seq_length)

    @cached_property
    def dev_sets(self) -> dict[str, datasets.Dataset]:
        return {split: self.features(examples) for split, examples in self.context.dev_examples().items()}

    def first_dev_texts(self) -> tuple[list[str], list[str] | None]:
        """The first dev split's texts (second segments for a pair task): real inputs for timing and examples."""
        first = next(iter(self.context.dev_examples().values()))
        return list(first["text_a"]), list(first["text_b"]) if self.context.task.is_pair else None

    def score(self, model: torch.nn.Module, batch_size: int, precision: Precision | None = None) -> Evaluation:
        """The task's metrics on every dev split (see :func:`kdrun.predict.score_dev_sets`)."""
        return score_dev_sets(model, self.context.task, self.dev_sets, self.collate, batch_size, precision)

    def evaluator(self, batch_size: int, model_of: Callable[[Any], torch.nn.Module] = _itself) -> Callable[[Any], Evaluation]:
        """A training job's ``evaluate``: the dev metrics of ``model_of(trained module)`` (the student
        inside a wrapper that also holds projections or a frozen encoder)."""
        return lambda module: self.score(model_of(module), batch_size)
