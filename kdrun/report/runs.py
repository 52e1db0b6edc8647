"""Finding and reading the results.json of runs, and the published numbers they are compared with."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from kdrun.results import RESULTS_FILE, STATUS_FAILED, STATUS_SKIPPED

REFERENCES_DIR = Path(__file__).resolve().parent / "references"


class ReportError(ValueError):
    """The runs cannot be made into the requested table; the message says what to change."""


def field_value(record: dict[str, Any], path: str) -> Any:
    """``a.b.c`` looked up in nested dicts; None when any part is missing."""
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def launch_order(path: Path | str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting a sweep's job directories in the order Hydra launched them (``2`` before ``10``), so
    that a table's rows keep the order of its sweep's rows; other names sort as text."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in Path(path).parts)


def find_results(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_file() and path.name == RESULTS_FILE:
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob(RESULTS_FILE), key=launch_order))
        else:
            raise ReportError(f"{path} is neither a run/sweep directory nor a {RESULTS_FILE} file.")
    return found


def load_runs(paths: Iterable[Path], skipped: bool = False) -> list[dict[str, Any]]:
    """Every results.json under ``paths``, each with ``_path`` (its run directory). Failed runs are included
    (see :func:`is_failed`): tables mark their cells rather than leave them out. Skipped sweep jobs (another
    recipe's ablation in a ``glob(*)`` sweep) are left out unless ``skipped``: they belong to no table."""
    runs = []
    for path in find_results(paths):
        record = json.loads(path.read_text())
        if record.get("status") == STATUS_SKIPPED and not skipped:
            continue
        record["_path"] = str(path.parent)
        runs.append(record)
    return runs


def is_failed(run: dict[str, Any]) -> bool:
    """A sweep job that stopped with an error: it has no metrics, only ``error``. Records written before
    kdrun recorded a status are successful runs."""
    return run.get("status") == STATUS_FAILED


def one_line(text: str) -> str:
    """An error message on one line (kdrun's validation lists one problem per line), for tables and logs."""
    return " ".join(text.split())


def sweep_jobs(sweep_dir: Path, runs: Sequence[dict[str, Any]]) -> list[str]:
    """The job directories of a sweep: where Hydra saved a job's config (``.hydra/``, written before the job
    runs) or that hold a results.json. ``runs`` are the sweep's loaded runs (:func:`load_runs`)."""
    started = {str(path.parent.parent) for path in sweep_dir.rglob(".hydra/config.yaml")}
    return sorted(started | {run["_path"] for run in runs}, key=launch_order)


def failed_jobs(sweep_dir: Path, runs: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The failed jobs of a sweep, job directory -> what went wrong (on one line): its results.json says it
    failed, or it has none (the job was killed before it could write one)."""
    recorded = {run["_path"]: run for run in load_runs([sweep_dir], skipped=True)}
    recorded.update({run["_path"]: run for run in runs})
    failures = {}
    for job in sweep_jobs(sweep_dir, runs):
        run = recorded.get(job)
        if run is None:
            failures[job] = f"no {RESULTS_FILE}: the job was killed or crashed before it could write one (see its log)"
        elif is_failed(run):
            failures[job] = one_line(str(run.get("error") or "no error message recorded"))
    return failures


def load_reference(name: str | None) -> dict[str, Any] | None:
    """Published numbers: a YAML path or a name in kdrun/report/references; ``a,b`` merges the rows of several
    tables (e.g. TinyBERT's Tables 2-4, which share their first row)."""
    if not name:
        return None
    tables = [_reference_file(part.strip()) for part in name.split(",")]
    if len(tables) == 1:
        return tables[0]
    merged: dict[str, Any] = {"source": _merged_source([t.get("source", "?") for t in tables]), "split": tables[0].get("split"), "rows": {}, "task_columns": {}, "aliases": {}}
    for table in tables:
        for row, values in (table.get("rows") or {}).items():
            for column, value in values.items():  # cell by cell: the first table that prints a cell wins
                merged["rows"].setdefault(row, {}).setdefault(column, value)
        for task, column in (table.get("task_columns") or {}).items():
            merged["task_columns"].setdefault(task, column)
        for ours, theirs in (table.get("aliases") or {}).items():
            merged["aliases"].setdefault(ours, theirs)
    return merged


def _merged_source(sources: Sequence[str]) -> str:
    """Tables of one paper name it once: "Jiao et al. 2020, ..., Table 2; Table 3" rather than the citation twice."""
    prefix = os.path.commonprefix(list(sources))
    cut = prefix.rfind(", ") + 2 if ", " in prefix else 0
    return sources[0][:cut] + "; ".join(source[cut:] for source in sources)


def _reference_file(name: str) -> dict[str, Any]:
    path = Path(name)
    if not path.is_file():
        path = REFERENCES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in REFERENCES_DIR.glob("*.yaml"))
        raise ReportError(f"reference table '{name}' not found (a YAML path or one of {known}).")
    return yaml.safe_load(path.read_text())
