"""The stage graph: which stages run, their cache keys, the cache, and its locks.

A stage's output lives in ``<cache.dir>/<stage>/<key>/`` where ``key`` hashes the
config slice the stage declares it reads, the content of the data it reads
(``Stage.sources``, ``kdrun/fingerprint.py``) and the keys of the stages it
consumes. It is computed in ``<key>.partial/`` (where an interrupted run's
checkpoints survive, so re-running resumes), guarded by ``<key>.lock`` so that
two processes never compute it twice, and renamed into place when complete.
Nothing in the cache is ever overwritten in place.

Every published entry's ``stage.json`` lists its files with their sizes and
SHA-256. A hit is verified against it before use (``cache.verify``): a damaged
entry (a file missing, truncated or changed) is reported, moved aside to
``<key>.damaged-<time>`` and computed again, never used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import filelock
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from kdrun import __version__
from kdrun.contract import (
    MODEL_INPUT, PipelineError, Stage, StageOutput, UndeclaredRead, cache_root_of, config_slice, stage_key, stage_view,
)

__all__ = [
    "PipelineError", "PlannedStage", "Stage", "StageCache", "StageOutput", "cache_root_of", "config_slice", "plan", "run_pipeline",
    "stage_key",
]

if TYPE_CHECKING:
    from kdrun.fingerprint import HashMemo

logger = logging.getLogger(__name__)

MANIFEST = "stage.json"


@dataclass
class PlannedStage:
    stage: Stage
    inputs: list[str]
    key: str
    slice: dict[str, Any] = field(default_factory=dict)
    # The stage whose model a ``consumes_model`` stage takes (its input named ``model``).
    model_from: str | None = None


def registered_stages() -> dict[str, Stage]:
    """Every stage a pipeline may list: the built-in table (``kdrun.stages.STAGES``), which names each
    stage's code without importing it, so that planning loads no model library."""
    from kdrun.stages import STAGES

    return dict(STAGES)


PRECISION_KEY = "device.precision"
SOURCES_KEY = "sources"


def _precision_name(cfg: DictConfig) -> str:
    from kdrun.precision import PrecisionError, resolve_precision

    try:
        return resolve_precision(cfg.device).name
    except PrecisionError as error:
        raise PipelineError(str(error)) from error


def _uses_precision(stage: Stage, cfg: DictConfig) -> bool:
    return stage.uses_precision(cfg) if callable(stage.uses_precision) else stage.uses_precision


def plan(cfg: DictConfig, memo: "HashMemo | None" = None) -> list[PlannedStage]:
    """Check the stage list and compute every key, before any work is done.

    ``memo``: the file hashes known so far (``kdrun/fingerprint.py``); by default those remembered
    in the cache, and nothing is written (planning alone leaves no trace).
    """
    from kdrun.validation import validate_config

    validate_config(cfg)
    precision = _precision_name(cfg)
    stages = registered_stages()
    names = list(cfg.pipeline.stages)
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise PipelineError(
            f"pipeline.stages names unknown stage(s) {unknown}; known stages: {sorted(stages)}."
        )
    for forced in cfg.cache.force:
        if forced not in names:
            raise PipelineError(f"cache.force names '{forced}', which is not in pipeline.stages {names}.")
    names = _needed(cfg, names, stages)
    from kdrun.fingerprint import HashMemo, fingerprint_sources

    memo = memo or HashMemo(cache_root(cfg))
    planned: list[PlannedStage] = []
    keys: dict[str, str] = {}
    for position, name in enumerate(names):
        stage = stages[name]
        before = names[:position]
        missing = [r for r in stage.requires if r not in before]
        if missing:
            raise PipelineError(f"Stage '{name}' needs {missing} to run before it in pipeline.stages ({names}).")
        inputs = list(stage.requires) + [u for u in stage.uses if u in before and _wanted(cfg, stage, u)]
        model_from = None
        if stage.consumes_model:
            producers = [n for n in before if stages[n].produces_model]
            if not producers:
                raise PipelineError(f"Stage '{name}' needs a model-producing stage before it in pipeline.stages ({names}).")
            model_from = producers[-1]
            if model_from not in inputs:
                inputs.append(model_from)
        slice_ = config_slice(cfg, stage.reads_for(cfg))
        if _uses_precision(stage, cfg):
            slice_[PRECISION_KEY] = precision
        if stage.sources:
            slice_[SOURCES_KEY] = fingerprint_sources(cfg, stage.sources, memo)
        keys[name] = stage_key(name, stage.version, slice_, {i: keys[i] for i in inputs})
        planned.append(PlannedStage(stage, inputs, keys[name], slice_, model_from))
    return planned


def cache_root(cfg: DictConfig) -> Path:
    return Path(cfg.cache.dir).expanduser().resolve()


def _wanted(cfg: DictConfig, stage: Stage, name: str) -> bool:
    return stage.wants is None or stage.wants(cfg, name)


def _needed(cfg: DictConfig, names: list[str], stages: dict[str, Stage]) -> list[str]:
    """``names`` without the stages that only exist to feed later ones, none of which wants them."""
    kept = []
    for position, name in enumerate(names):
        users = [stages[later] for later in names[position + 1 :] if name in stages[later].uses]
        if users and not any(_wanted(cfg, user, name) for user in users):
            logger.info("%s: skipped, no later stage needs it with this config.", name)
            continue
        kept.append(name)
    return kept


def _read_manifest(path: Path) -> dict[str, Any] | None:
    manifest = path / MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else None


VERIFY_MODES = ("auto", "size", "full")
# cache.verify=auto hashes entries up to this size on every hit (about 1 s a GB here) and checks sizes above it.
AUTO_HASH_LIMIT_BYTES = 2 << 30


def entry_files(directory: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {size, sha256}}`` of every file of a computed entry but its manifest and lock files."""
    from kdrun.fingerprint import sha256_of

    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = str(path.relative_to(directory))
        if name != MANIFEST and not name.endswith(".lock"):  # lock files (datasets' among them) hold no content
            files[name] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    return files


def damage(directory: Path, manifest: dict[str, Any], mode: str) -> str | None:
    """What is wrong with a published entry (None: it is what was published). ``mode``: see VERIFY_MODES."""
    from kdrun.fingerprint import sha256_of

    files = manifest.get("files")
    if files is None:
        return f"its {MANIFEST} lists no files (written by an older kdrun, which did not record them)"
    hash_them = mode == "full" or (mode == "auto" and sum(f["size"] for f in files.values()) <= AUTO_HASH_LIMIT_BYTES)
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size:,} bytes, not the {expected['size']:,} it was published with"
        if hash_them and sha256_of(path) != expected["sha256"]:
            return f"{name} is not the file that was published (its SHA-256 differs)"
    return None


class StageCache:
    """``<root>/<stage>/<key>`` directories, computed under a lock, published by rename and verified when reused.

    Under DDP (``accelerate launch`` / ``torchrun``) every rank runs the same
    pipeline: the main rank takes the lock and decides hit or compute, all ranks
    compute together (the training loop shards the batches), and the main rank
    publishes. ``group`` is anything with accelerate's ``num_processes``,
    ``is_main_process`` and ``wait_for_everyone``; None means a single process.
    """

    def __init__(self, root: Path, lock_timeout: float | None = None, group: Any = None, verify: str = "auto"):
        if verify not in VERIFY_MODES:
            raise PipelineError(f"cache.verify must be one of {VERIFY_MODES}, got '{verify}'.")
        self.root = root
        self.lock_timeout = -1 if lock_timeout is None else lock_timeout
        self.group = group
        self.verify = verify

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> dict[str, Any] | None:
        return _read_manifest(self.path(stage, key))

    @property
    def _distributed(self) -> bool:
        return self.group is not None and self.group.num_processes > 1

    @property
    def _is_main(self) -> bool:
        return self.group is None or self.group.is_main_process

    def _agree(self, decision: str) -> str:
        """Every rank adopts the main rank's decision."""
        if not self._distributed:
            return decision
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([decision])[0]

    def _usable(self, name: str, key: str, locked: bool) -> dict[str, Any] | None:
        """The manifest of a published entry that passes verification. Holding the lock, a damaged entry is moved
        aside (so that it is computed again); without it, it is only reported as unusable."""
        final = self.path(name, key)
        try:
            manifest = _read_manifest(final)
        except ValueError:  # a truncated stage.json
            manifest = {}
        if manifest is None:
            return None
        problem = damage(final, manifest, self.verify) if manifest else f"its {MANIFEST} is not valid JSON"
        if problem is None:
            return manifest
        if locked:
            aside = final.with_name(f"{final.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            final.rename(aside)
            logger.warning("%s: the cached entry %s is damaged (%s); moved it to %s and computing it again.", name, final, problem, aside)
        return None

    def get_or_compute(
        self, planned: PlannedStage, compute: Callable[[Path], dict[str, Any]], force: bool = False
    ) -> StageOutput:
        name, key = planned.stage.name, planned.key
        final = self.path(name, key)
        lock = filelock.FileLock(str(final) + ".lock")
        decision, manifest = "compute", None
        if self._is_main:
            manifest = None if force else self._usable(name, key, locked=False)
            if manifest is not None:
                decision = "hit"
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                self._acquire(lock, name, final)
                manifest = None if force else self._usable(name, key, locked=True)
                if manifest is not None:
                    decision = "hit"
                    lock.release()
        decision = self._agree(decision)
        if decision == "hit":
            return self._hit(planned, final, manifest if manifest is not None else self.lookup(name, key) or {})
        try:
            return self._compute(planned, compute, final)
        finally:
            if self._is_main:
                lock.release()

    def _acquire(self, lock: filelock.FileLock, name: str, final: Path) -> None:
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            logger.info("%s: another kdrun process is computing %s; waiting for it.", name, final)
            lock.acquire(timeout=self.lock_timeout)

    def _compute(self, planned: PlannedStage, compute: Callable[[Path], dict[str, Any]], final: Path) -> StageOutput:
        name = planned.stage.name
        partial = Path(str(final) + ".partial")
        resumed = partial.exists() and any(partial.iterdir())
        if resumed:
            logger.info("%s: resuming the interrupted computation in %s.", name, partial)
        partial.mkdir(parents=True, exist_ok=True)
        started = time.time()
        summary = compute(partial)
        seconds = time.time() - started
        if self._is_main:
            manifest = {
                "stage": name,
                "key": planned.key,
                "config": planned.slice,
                "inputs": planned.inputs,
                "summary": summary,
                "seconds": seconds,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "host": socket.gethostname(),
                "kdrun_version": __version__,
                "files": entry_files(partial),
            }
            temporary = partial / f".{MANIFEST}.tmp"
            temporary.write_text(json.dumps(manifest, indent=2, default=str))
            os.replace(temporary, partial / MANIFEST)
            if final.exists():  # forced: move the old output aside, publish, then delete it
                retired = Path(f"{final}.replaced-{int(time.time())}")
                final.rename(retired)
                partial.rename(final)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                partial.rename(final)
        if self._distributed:
            self.group.wait_for_everyone()
        return StageOutput(name, planned.key, final, summary, "resumed" if resumed else "computed", seconds)

    @staticmethod
    def _hit(planned: PlannedStage, final: Path, manifest: dict[str, Any]) -> StageOutput:
        logger.info(
            "%s: cache hit, reusing %s (computed %s in %.0f s).",
            planned.stage.name, final, manifest.get("created", "?"), manifest.get("seconds", 0.0),
        )
        return StageOutput(planned.stage.name, planned.key, final, manifest.get("summary", {}), "hit")


def run_pipeline(cfg: DictConfig, run_dir: Path) -> dict[str, StageOutput]:
    """Run ``cfg.pipeline.stages`` in order, reusing cached outputs; returns every stage's output."""
    from kdrun.fingerprint import HashMemo

    memo = HashMemo(cache_root(cfg))
    planned = plan(cfg, memo)
    for step in planned:
        if step.stage.check is not None:
            step.stage.check(cfg)
    from kdrun.precision import log_choice, resolve_precision
    from kdrun.train import get_accelerator

    log_choice(resolve_precision(cfg.device))

    group = get_accelerator(cfg.device)
    if group.is_main_process:
        memo.save()
    cache = StageCache(cache_root(cfg), cfg.cache.lock_timeout, group, cfg.cache.verify)
    outputs: dict[str, StageOutput] = {}
    for step in planned:
        inputs = {name: outputs[name] for name in step.inputs}
        if step.model_from is not None:
            inputs[MODEL_INPUT] = outputs[step.model_from]
        stage = step.stage
        view = stage_view(cfg, stage)
        if stage.cached:
            outputs[stage.name] = cache.get_or_compute(
                step, lambda out, s=stage, v=view, i=inputs: _run_stage(s, v, i, out), force=stage.name in cfg.cache.force
            )
        else:
            started = time.time()
            summary = _run_stage(stage, view, inputs, run_dir)
            outputs[stage.name] = StageOutput(stage.name, step.key, run_dir, summary, "uncached", time.time() - started)
        logger.info("%s: done (%s).", stage.name, outputs[stage.name].cache)
    return outputs


def _run_stage(stage: Stage, view: DictConfig, inputs: dict[str, StageOutput], out_dir: Path) -> dict[str, Any]:
    """``stage.run`` on its view of the config; a read outside the view names the stage and the key."""
    from kdrun.stages.context import StageContext

    try:
        return stage.run(StageContext(stage.name, view, inputs, out_dir))
    except (ConfigAttributeError, ConfigKeyError) as error:
        full_key = getattr(error, "full_key", None) or str(error).splitlines()[0]
        raise UndeclaredRead(
            f"Stage '{stage.name}' read the config setting {full_key}, which its declaration (kdrun/stages/__init__.py) "
            "does not list: add it to the stage's reads (keyed) or unkeyed."
        ) from error
