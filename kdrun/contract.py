"""What a stage is, what it may read, and what it is handed: the contract between the pipeline and its stages.

Torch-free, and importing no stage, so that planning (``kdrun.pipeline.plan``: every key, before any
work) never loads a model library, and so that stages, the stage table (``kdrun.stages``) and the
pipeline depend on this module rather than on each other.

A stage's ``run`` is handed a *view* of the config (:func:`stage_view`): exactly the paths it declares
(``reads``, which its cache key hashes), the config paths behind the data sources whose content its key
hashes (``sources``: ``teacher`` gives ``teacher.path``), the device (its resolved precision is keyed
where it matters) and what it declares ``unkeyed``. Reading anything else fails with
:class:`UndeclaredRead`, so a stage cannot depend on a setting its key does not see.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from kdrun.config import to_container

if TYPE_CHECKING:
    from kdrun.stages.context import StageContext

MODEL_INPUT = "model"
"""The input name under which a ``consumes_model`` stage gets the output of the last model-producing stage before it."""

# Config paths that the content fingerprint of a source (``kdrun.fingerprint.SOURCES``) stands for in a key:
# the path itself is not keyed (the same files elsewhere give the same key), but the stage may read it.
SOURCE_PATHS: dict[str, tuple[str, ...]] = {
    "glue": ("data.glue_dir",),
    "corpus": ("data.corpus",),
    "teacher": ("teacher.path", "teacher.revision"),
    "student.init": ("student.init",),
    "student.glove": ("student.glove",),
    "augment.glove": ("augment.glove",),
    "augment.mlm_model": ("augment.mlm_model",),
    "export.model": ("export.model",),
    "spacy": (),
}
# Every stage may read the device: where it runs does not change what it computes, and the precision it
# computes in joins the key (``Stage.uses_precision``) as resolved, never as ``auto``.
ALWAYS_VISIBLE = ("device",)


class PipelineError(ValueError):
    """The pipeline cannot run as configured; the message says what to change."""


@contextmanager
def user_errors(where: str, *kinds: type[Exception]) -> Iterator[None]:
    """Settings a library or a settings class rejects (``ValueError`` unless ``kinds`` say otherwise)
    become one :class:`PipelineError` line that starts with ``where`` (a stage or a config path), not a
    traceback; a :class:`PipelineError` passes through unchanged."""
    try:
        yield
    except PipelineError:
        raise
    except (kinds or (ValueError,)) as error:
        raise PipelineError(f"{where}: {error}") from error


class UndeclaredRead(PipelineError):
    """A stage read a config setting outside its declared reads: a bug in the stage's declaration."""


@dataclass(frozen=True)
class StageOutput:
    """A completed stage: where its files are and what it reported."""

    name: str
    key: str
    path: Path
    summary: dict[str, Any]
    cache: str  # "computed", "resumed", "hit" or "uncached"
    seconds: float = 0.0


StageRun = Callable[["StageContext"], dict[str, Any]]
"""A stage's job: given its context (``kdrun.stages.context.StageContext``: config view, named inputs, output
directory), write its files into ``ctx.out_dir`` and return its summary."""
Reads = tuple[str, ...] | Callable[[DictConfig], tuple[str, ...]]


class Lazy:
    """``module:function``, imported at the first call: the stage table names its stages' code without
    importing it (a stage module imports torch; the table must not)."""

    def __init__(self, target: str):
        self.target = target
        self._function: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._function is None:
            module, _, name = self.target.partition(":")
            self._function = getattr(importlib.import_module(module), name)
        return self._function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Lazy({self.target!r})"


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: a plain function plus what it reads and consumes.

    ``reads``: dotted config paths that determine its output (the cache key), or a function of the
    config giving them (a distillation stage reads its method's fields, ``kdrun.methods``).
    ``requires``: stages that must run before it (their keys join its key).
    ``uses``: stages it takes when they run before it (e.g. task distillation starts
    from general distillation's student when there is one), else goes without.
    ``wants``: given the config and the name of one of ``uses``, whether this config
    needs it (None: always). A listed stage that later stages could use but none
    wants is skipped (e.g. fit_mlm_head when augmentation is not TinyBERT's).
    ``consumes_model``: it takes the model of the last model-producing stage before it, as its
    input named ``model`` (:data:`MODEL_INPUT`).
    ``cached``: False for stages whose output belongs to the run (evaluation, reports).
    ``version``: bump when the stage's code changes what it computes.
    ``uses_precision``: whether (given the config) the stage computes in the run's
    precision, so that it joins the key: a bf16-trained teacher is another artefact
    than an fp32 one. The resolved precision (never ``auto``) is what is keyed.
    ``sources``: the data it reads from outside the cache (names in
    ``kdrun.fingerprint.SOURCES``: ``glue``, ``corpus``, ``teacher``, ...); their
    content hashes join the key.
    ``unkeyed``: config paths it reads that do not change its output (say why where it is declared).
    """

    name: str
    run: StageRun
    reads: Reads = ()
    requires: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    wants: Callable[[DictConfig, str], bool] | None = None
    consumes_model: bool = False
    produces_model: bool = False
    cached: bool = True
    check: Callable[[DictConfig], None] | None = None
    version: str = "1"
    uses_precision: bool | Callable[[DictConfig], bool] = True
    sources: tuple[str, ...] = ()
    unkeyed: tuple[str, ...] = ()

    def reads_for(self, cfg: DictConfig) -> tuple[str, ...]:
        return self.reads(cfg) if callable(self.reads) else self.reads


def stage_view(cfg: DictConfig, stage: Stage) -> DictConfig:
    """The part of ``cfg`` that ``stage`` may read (see the module docstring), resolved and read-only."""
    paths = list(stage.reads_for(cfg)) + [p for s in stage.sources for p in SOURCE_PATHS.get(s, ())]
    paths += [*ALWAYS_VISIBLE, *stage.unkeyed]
    tree: dict[str, Any] = {}
    for path in paths:
        node = OmegaConf.select(cfg, path, default=_ABSENT, throw_on_missing=True)
        if node is _ABSENT:  # e.g. student.init of a kind that has none
            continue
        _put(tree, path.split("."), to_container(node))
    view = OmegaConf.create(tree)
    OmegaConf.set_struct(view, True)
    OmegaConf.set_readonly(view, True)
    return view


_ABSENT = object()


def _put(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set ``tree[parts]``; a parent already set whole (``distill`` and ``distill.name``) keeps its value."""
    for part in parts[:-1]:
        child = tree.setdefault(part, {})
        if not isinstance(child, dict):
            return
        tree = child
    if isinstance(tree.get(parts[-1]), dict) and isinstance(value, dict):
        tree[parts[-1]] = {**value, **tree[parts[-1]]}
    else:
        tree.setdefault(parts[-1], value)


def config_slice(cfg: DictConfig, paths: tuple[str, ...]) -> dict[str, Any]:
    """The resolved values of ``paths``; what a stage's output depends on."""
    values: dict[str, Any] = {}
    for path in paths:
        node = OmegaConf.select(cfg, path, throw_on_missing=True)
        values[path] = to_container(node)
    return values


def cache_root_of(output: StageOutput) -> Path:
    """The cache directory holding a cached stage's output (``<root>/<stage>/<key>``): where data that
    several stages share, such as a teacher's logits, is kept beside the stage outputs."""
    return output.path.parent.parent


def stage_key(name: str, version: str, slice_: dict[str, Any], input_keys: dict[str, str]) -> str:
    payload = json.dumps(
        {"stage": name, "version": version, "config": slice_, "inputs": input_keys}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
