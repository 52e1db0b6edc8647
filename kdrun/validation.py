"""Checks of a composed config that need no stage: what every run must satisfy before any compute.

:func:`validate_config` runs first in ``kdrun.pipeline.plan``. It collects every
problem it finds (keys the schema does not know, values out of range) and raises
one :class:`~kdrun.pipeline.PipelineError` listing them one per line, so a user
fixes a config in one round instead of one traceback per run. Settings of a stage
that is not in ``pipeline.stages`` (or of a step with ``enabled: false``) are not
checked: a disabled stage's values must not block a run.

"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdrun.config import TrainConfig, schema_fields, schema_paths_of_type
from kdrun.recipes import ablation_problem

# Keys Hydra itself may put at the root of a composed config (``compose(return_hydra_config=True)``).
_NOT_SCHEMA_KEYS = frozenset({"hydra"})
# Suggest a known key for an unknown one only when the names are this similar (difflib ratio).
_NAME_CUTOFF = 0.75
_PATH_CUTOFF = 0.85


# --------------------------------------------------------------------------- unknown keys


def unknown_key_problems(cfg: DictConfig) -> list[str]:
    """One line per key of ``cfg`` that the schema lacks (Hydra's ``+key=value`` adds such keys
    unchecked, so a misspelt setting would otherwise be ignored in silence)."""
    schema = dict(schema_fields(actual=cfg))
    tree = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    known = sorted(schema)
    return [_unknown_key_line(path, known) for path in _unknown_paths(tree, schema, "")]


def _unknown_paths(tree: dict[str, Any], schema: dict[str, Any], prefix: str) -> Iterator[str]:
    for key, value in tree.items():
        path = prefix + str(key)
        if not prefix and key in _NOT_SCHEMA_KEYS:
            continue
        if path not in schema:
            yield from _leaf_paths(value, path)
        elif isinstance(value, dict):
            yield from _unknown_paths(value, schema, path + ".")


def _leaf_paths(value: Any, path: str) -> Iterator[str]:
    """Every dotted leaf under ``path``: the keys the user actually typed (``+a.b.c=1`` gives ``a.b.c``)."""
    if isinstance(value, dict) and value:
        for key, child in value.items():
            yield from _leaf_paths(child, f"{path}.{key}")
    else:
        yield path


def _unknown_key_line(path: str, known: list[str]) -> str:
    suggestion = suggest_key(path, known)
    hint = f"did you mean {suggestion}?" if suggestion else "remove it (`kdrun --cfg job` prints every setting)."
    return f"{path} is not a kdrun setting (a '+' override adds keys unchecked); {hint}"


def suggest_key(path: str, known: list[str]) -> str | None:
    """The known dotted key ``path`` most likely meant, or None.

    A sibling with a similar name comes first (``train.learnig_rate`` -> ``train.learning_rate``);
    else a similar full path whose own name is similar too (``finetune_teacher.learning_rate`` ->
    ``finetune_teacher.train.learning_rate``), so that ``train.lr`` is not "corrected" to ``train.seed``
    merely because the two share a long prefix.
    """
    parent, _, name = path.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    close = difflib.get_close_matches(name, list(siblings), n=1, cutoff=_NAME_CUTOFF)
    if close:
        return siblings[close[0]]
    for candidate in difflib.get_close_matches(path, known, n=3, cutoff=_PATH_CUTOFF):
        if _similar(name, candidate.rpartition(".")[2]):
            return candidate
    return None


def _similar(a: str, b: str) -> bool:
    return difflib.SequenceMatcher(None, a, b).ratio() >= _NAME_CUTOFF


# --------------------------------------------------------------------------- value bounds


@dataclass(frozen=True)
class Bound:
    """The values a numeric setting may take: ``low`` (excluded when ``low_open``) to ``high``,
    plus the special ``also`` values, plus null when ``optional``. Every entry of a list setting must
    be in bounds. ``why`` says what goes wrong otherwise, where that is not obvious."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    optional: bool = False
    also: tuple[float, ...] = ()
    why: str = ""

    def admits(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, (list, tuple)):
            return all(self.admits(item) for item in value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if value in self.also:
            return True
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"between {_number(self.low)} and {_number(self.high)}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_number(self.low)}"
        else:
            text = "a number" if self.high is None else f"<= {_number(self.high)}"
        options = [*(_number(v) for v in self.also), text]
        if self.optional:
            options.insert(0, "null")
        return " or ".join(options)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


AT_LEAST_ONE = Bound(low=1)
OPTIONAL_AT_LEAST_ONE = Bound(low=1, optional=True)
POSITIVE = Bound(low=0, low_open=True)
NON_NEGATIVE = Bound(low=0)
PROBABILITY = Bound(low=0, high=1)
MASKING_RATE = Bound(low=0, high=1, low_open=True, why="a masked-LM loss needs some masked tokens")
SEQUENCE_LENGTH = Bound(low=8, why="[CLS] and [SEP] leave too few tokens of text")
QUANTIZATION_BITS = Bound(low=2, high=8, why="the symmetric grids need 2 bits, and Q-BERT's range ends at 8")

TRAIN_BOUNDS: dict[str, Bound] = {
    "epochs": POSITIVE,
    "max_steps": Bound(low=1, optional=True, why="0 steps would publish an untrained model"),
    "batch_size": AT_LEAST_ONE,
    "eval_batch_size": AT_LEAST_ONE,
    "learning_rate": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "warmup_ratio": PROBABILITY,
    "grad_accum_steps": AT_LEAST_ONE,
    "max_grad_norm": NON_NEGATIVE,
    "adam_epsilon": POSITIVE,
    "eval_every_steps": OPTIONAL_AT_LEAST_ONE,
    "checkpoint_every_steps": AT_LEAST_ONE,
    "log_every_steps": AT_LEAST_ONE,
}
"""Bounds of the fields of every TrainConfig node (one per training stage or step; the nodes are found by
walking the schema, so a stage that adds one is checked without listing it here)."""

VALUE_BOUNDS: dict[str, Bound] = {
    "data.max_seq_length": SEQUENCE_LENGTH,
    "data.max_train_examples": Bound(low=1, optional=True, why="0 examples leave nothing to train on"),
    "data.max_eval_examples": Bound(low=1, optional=True, why="0 examples leave nothing to score"),
    "student.num_hidden_layers": AT_LEAST_ONE,
    "student.hidden_size": AT_LEAST_ONE,
    "student.intermediate_size": AT_LEAST_ONE,
    "student.num_attention_heads": AT_LEAST_ONE,
    "evaluate.batch_size": AT_LEAST_ONE,
    "evaluate.latency_batch_sizes": AT_LEAST_ONE,
    "evaluate.latency_seq_length": SEQUENCE_LENGTH,
    "evaluate.latency_warmup": NON_NEGATIVE,
    "evaluate.latency_repeats": AT_LEAST_ONE,
    "general_distill.max_seq_length": SEQUENCE_LENGTH,
    "general_distill.max_sequences": OPTIONAL_AT_LEAST_ONE,
    "distill.mlm_probability": MASKING_RATE,
    "fit_mlm_head.max_seq_length": SEQUENCE_LENGTH,
    "fit_mlm_head.max_sequences": OPTIONAL_AT_LEAST_ONE,
    "fit_mlm_head.heldout_sequences": Bound(low=1, why="masked-token accuracy is measured on them"),
    "fit_mlm_head.mlm_probability": MASKING_RATE,
    "fit_mlm_head.train_top_layers": NON_NEGATIVE,
    "augment.max_examples": Bound(low=0, optional=True),
    "augment.shard_size": AT_LEAST_ONE,
    "quantize.weight_bits": QUANTIZATION_BITS,
    "quantize.mixed_bits": QUANTIZATION_BITS,
    "quantize.embedding_bits": Bound(low=2, high=8, optional=True),
    "quantize.activation_bits": Bound(low=2, high=8, optional=True),
    "quantize.groups": Bound(low=1, also=(-1,), why="-1 means one range per row"),
    "quantize.hessian.batches": AT_LEAST_ONE,
    "quantize.hessian.batch_size": AT_LEAST_ONE,
    "quantize.hessian.max_iterations": AT_LEAST_ONE,
    "quantize.hessian.tolerance": POSITIVE,
    "export.regression_tolerance": NON_NEGATIVE,
    "export.min_agreement.onnx": PROBABILITY,
    "export.min_agreement.onnx_int8": PROBABILITY,
    "export.opset": Bound(low=13, high=20, why="per-channel int8 needs opset 13; torch's TorchScript exporter writes up to 20"),
}
"""Other settings that would otherwise fail (or silently do nothing) only once a stage computes."""

_ABSENT = object()
# Sections read by a stage other than the one they are named after.
_SECTION_OWNERS = {"quantize.hessian": "sensitivity"}


def value_problems(cfg: DictConfig, stage_names: set[str]) -> list[str]:
    """One line per setting out of bounds, among those the configured stages read.

    ``stage_names``: every registered stage; a path under one of them (``quantize.train``) is
    checked only when that stage is in ``pipeline.stages``; other paths (``data``, ``student``) always,
    when the chosen method or student kind has them.
    """
    active = set(cfg.pipeline.stages)
    bounds = {f"{node}.{name}": bound for node in schema_paths_of_type(TrainConfig) for name, bound in TRAIN_BOUNDS.items()}
    bounds.update(VALUE_BOUNDS)
    problems = []
    for path, bound in bounds.items():
        owner = _owner(path, stage_names)
        if (owner is not None and owner not in active) or _disabled(cfg, path):
            continue
        value = OmegaConf.select(cfg, path, throw_on_missing=False, default=_ABSENT)
        if value is _ABSENT:  # another method's or student kind's setting
            continue
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        if not bound.admits(value):
            problems.append(_value_line(path, value, bound))
    return problems


def _owner(path: str, stage_names: set[str]) -> str | None:
    """The stage that reads ``path``, or None for settings every run reads."""
    for section, owner in _SECTION_OWNERS.items():
        if path.startswith(section + "."):
            return owner
    first = path.split(".", 1)[0]
    return first if first in stage_names else None


def _disabled(cfg: DictConfig, path: str) -> bool:
    """Whether a node above ``path`` says ``enabled: false`` (a task_distill step that does not run)."""
    parts = path.split(".")
    for depth in range(1, len(parts)):
        if OmegaConf.select(cfg, ".".join(parts[:depth] + ["enabled"]), default=True) is False:
            return True
    return False


def _value_line(path: str, value: Any, bound: Bound) -> str:
    shown = "null" if value is None else value
    why = f" ({bound.why})" if bound.why else ""
    subject = f"{path}={shown}: every entry" if isinstance(value, list) else f"{path}={shown}"
    return f"{subject} must be {bound.describe()}{why}."


# --------------------------------------------------------------------------- entry point


def validate_config(cfg: DictConfig) -> None:
    """Raise one ``kdrun.pipeline.PipelineError`` listing every problem of ``cfg``, one per line."""
    from kdrun.pipeline import PipelineError, registered_stages

    problems = unknown_key_problems(cfg) + value_problems(cfg, set(registered_stages())) + dependency_problems(cfg)
    ablation = ablation_problem(cfg)
    if ablation:
        problems.insert(0, ablation)
    if problems:
        raise PipelineError(format_problems(problems))


def dependency_problems(cfg: DictConfig) -> list[str]:
    """Optional packages the configured stages need: the export stage's ONNX packages (the ``export`` extra)."""
    if "export" not in cfg.pipeline.stages:
        return []
    from kdrun.export import missing_packages_problem

    problem = missing_packages_problem()
    return [problem] if problem else []


def format_problems(problems: list[str]) -> str:
    """One problem: one line. Several: a count, then one indented line each."""
    if len(problems) == 1:
        return f"Invalid config: {problems[0]}"
    return f"Invalid config ({len(problems)} problems):\n" + "\n".join(f"  {line}" for line in problems)
