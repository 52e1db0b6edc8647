"""Finding and reading the results.json of runs, and the published numbers they are compared with."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

RESULTS_FILE = "results.json"
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


def find_results(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_file() and path.name == RESULTS_FILE:
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob(RESULTS_FILE)))
        else:
            raise ReportError(f"{path} is neither a run/sweep directory nor a {RESULTS_FILE} file.")
    return found


def load_runs(paths: Iterable[Path]) -> list[dict[str, Any]]:
    runs = []
    for path in find_results(paths):
        record = json.loads(path.read_text())
        record["_path"] = str(path.parent)
        runs.append(record)
    return runs


def load_reference(name: str | None) -> dict[str, Any] | None:
    """Published numbers: a YAML path or a name in kdrun/report/references; ``a,b`` merges the rows of several
    tables (e.g. TinyBERT's Tables 2-4, which share their first row)."""
    if not name:
        return None
    tables = [_reference_file(part.strip()) for part in name.split(",")]
    if len(tables) == 1:
        return tables[0]
    merged: dict[str, Any] = {"source": _merged_source([t.get("source", "?") for t in tables]), "split": tables[0].get("split"), "rows": {}, "task_columns": {}}
    for table in tables:
        for row, values in (table.get("rows") or {}).items():
            for column, value in values.items():  # cell by cell: the first table that prints a cell wins
                merged["rows"].setdefault(row, {}).setdefault(column, value)
        for task, column in (table.get("task_columns") or {}).items():
            merged["task_columns"].setdefault(task, column)
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
