"""``results.json``: every number a run reports, next to its resolved config.

Reports and paper tables are rebuilt from these files alone, so the record
carries the choices that identify the run (experiment, task, scale, overrides)
together with each stage's summary and cache status. A sweep job that failed
writes one too (``status: failed`` and the error), so the sweep's table can show
the failed cell instead of silently leaving it out.

Each record names the run that wrote it (``run_id``), and a run never replaces
another run's file: two runs pointed at one directory (an explicit
``hydra.run.dir``, a reused ``hydra.sweep.dir``) fail loudly instead of one
result silently replacing the other.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from kdrun import __version__

if TYPE_CHECKING:  # only for annotations: recording a failure must not need the pipeline to import
    from kdrun.pipeline import StageOutput

RESULTS_FILE = "results.json"
STATUS_OK = "ok"
STATUS_FAILED = "failed"
# A sweep job that does not apply to its recipe (another recipe's ablation row): no metrics, not a failure.
STATUS_SKIPPED = "skipped"
CHOICE_GROUPS = ("teacher", "student", "distill", "augment", "quantize", "device")


class ResultsConflict(RuntimeError):
    """The run directory already holds another run's results.json; the message says how to proceed."""


def run_identity(cfg: DictConfig, overrides: list[str], run_id: str) -> dict[str, Any]:
    """The fields that place a run in a report (its row and column keys) and say how to repeat it.

    Shared by successful and failed records so that a failed job lands in the same cell its success would
    have. Values that cannot be resolved (the config itself may be what failed) are recorded as None.
    """
    experiment, task = _resolved(cfg, "experiment_name"), _resolved(cfg, "task.name")
    return {
        "kdrun_version": __version__,
        "run_id": run_id,
        "experiment": experiment,
        # The experiment without its task (tinybert_mrpc -> tinybert): a row key across tasks.
        "recipe": _resolved(cfg, "recipe"),
        "task": task,
        "ablation": _resolved(cfg, "ablation"),
        "scale": _resolved(cfg, "scale"),
        "choices": {group: _resolved(cfg, f"{group}.name") for group in CHOICE_GROUPS},
        "overrides": overrides,
        "report": _resolved(cfg, "report"),
    }


def _resolved(cfg: DictConfig, key: str) -> Any:
    """``cfg.<key>`` as plain data, or None when it is missing or does not resolve."""
    try:
        value = OmegaConf.select(cfg, key)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except Exception:  # noqa: BLE001 - any resolution error: the record must still be written
        return None


def build_results(cfg: DictConfig, outputs: dict[str, StageOutput], overrides: list[str], run_id: str) -> dict[str, Any]:
    record: dict[str, Any] = {
        **run_identity(cfg, overrides, run_id),
        "status": STATUS_OK,
        "stages": {
            name: {"key": out.key, "cache": out.cache, "path": str(out.path), "seconds": round(out.seconds, 2), "summary": out.summary}
            for name, out in outputs.items()
        },
    }
    if "evaluate" in outputs:
        evaluation = outputs["evaluate"].summary
        record.update(metrics=evaluation["dev"], main_metric=evaluation["main_metric"], main_score=evaluation["main_score"], efficiency=evaluation["efficiency"])
        record["predicts_one_class"] = evaluation.get("predicts_one_class")
        record["precision"] = evaluation["efficiency"].get("precision")
        record["deployment"] = evaluation.get("deployment", {})
    if "export" in outputs:
        record.update(export_record(outputs["export"], "evaluate" not in outputs))
    return record


def export_record(output: StageOutput, standalone: bool) -> dict[str, Any]:
    """What the export stage adds to results.json: ``export`` (where the graphs are, parity, where the latencies
    were measured) and ``deployment``, its table of every format measured side by side in one process (the
    evaluate stage's own table stays in its summary). A standalone export (no evaluate stage) also gives the
    run its metrics: those of the PyTorch fp32 model it exported."""
    summary = output.summary
    record: dict[str, Any] = {
        "export": {
            "dir": str(output.path / summary["export_dir"]),
            "files": {name: str(output.path / file) for name, file in summary["files"].items()},
            "parity": summary["parity"],
            "measured_on": summary["measured_on"],
        },
        "deployment": summary["deployment"],
    }
    if standalone:
        reference = summary["deployment"]["fp32"]
        record.update(metrics=reference["dev"], main_metric=summary["main_metric"], main_score=reference["main_score"], precision="fp32")
        record["predicts_one_class"] = reference.get("predicts_one_class")
    return record


def build_failure(cfg: DictConfig, overrides: list[str], run_id: str, error: BaseException, user_error: bool) -> dict[str, Any]:
    """The record of a sweep job that stopped with ``error``: its identity, no metrics, and the message
    (prefixed with the exception's type unless it is one of kdrun's user errors, whose message says it all)."""
    message = str(error) if user_error else f"{type(error).__name__}: {error}"
    return {**run_identity(cfg, overrides, run_id), "status": STATUS_FAILED, "error": message, "error_type": type(error).__name__}


def build_skipped(cfg: DictConfig, overrides: list[str], run_id: str, reason: str) -> dict[str, Any]:
    """The record of a sweep job that did not run because it does not apply (kdrun.recipes)."""
    return {**run_identity(cfg, overrides, run_id), "status": STATUS_SKIPPED, "reason": reason}


def check_results_dir(run_dir: Path, run_id: str) -> None:
    """Raise ResultsConflict when ``run_dir`` already holds a results.json written by a run other than ``run_id``.

    Called before a run does any work (so a clash costs nothing) and again when it writes. The same run may
    rewrite its own file: a DDP job that the launcher restarts keeps its run_id and its directory.
    """
    path = run_dir / RESULTS_FILE
    if not path.exists():
        return
    try:
        existing = json.loads(path.read_text())
    except (OSError, ValueError):
        existing = None
    writer = existing.get("run_id") if isinstance(existing, dict) else None
    if writer != run_id:
        raise ResultsConflict(
            f"{path} already holds the results of another run ({writer or 'an unreadable or older record'}); "
            "kdrun does not overwrite them. Leave hydra.run.dir / hydra.sweep.dir at their defaults (unique for "
            "every run) or give this run a new directory, or delete that results.json if it is no longer wanted."
        )


def write_results(record: dict[str, Any], run_dir: Path) -> Path:
    """Write ``run_dir``/results.json atomically: the record goes to a temporary file that is renamed over
    results.json, so a reader (or a run killed mid-write) never sees half a file. Refuses to replace another
    run's results (see check_results_dir); the window between that check and the rename is microseconds,
    and only runs sharing an explicitly chosen directory can meet in it."""
    check_results_dir(run_dir, record["run_id"])
    path = run_dir / RESULTS_FILE
    temporary = run_dir / f".{RESULTS_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with temporary.open("x") as handle:
            handle.write(json.dumps(record, indent=2, default=str))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
