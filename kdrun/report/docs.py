"""``docs/results.md``, rendered from measurement records, never typed by hand.

    python -m kdrun.report.docs [--measurements docs/measurements] [--out docs/results.md]

It reads, under ``docs/measurements``:

- ``runs/<name>/results.json``: copies of the results.json of real runs (``kdrun.results``), each a row of the
  runs table (its command rebuilt from its overrides) and, when it has one, a deployment table; an optional
  ``runs/<name>/note.md`` (one line) says what the record shows or under which conditions it was measured;
- ``resume_matrix.json``: the kill/resume matrix of ``scripts/resume_matrix.py``;
- ``bench_*.json``: what the benchmarks printed, one table per file;
- ``tables/<name>/summary.md``: a table over several runs (seeds as mean ± std), written by
  ``python -m kdrun.report <run or sweep dirs> --out docs/measurements/tables/<name>``, with an optional
  ``note.md`` (the commands, wall times and conditions).

Add a run with ``python -m kdrun.report.docs --add outputs/runs/<experiment>/<id> --name <name>`` (copies its
results.json) and a finished sweep with ``--add-table outputs/multirun/<name>/<id> --name <name>`` (its table, and
a note with the command, wall time and machine read from the sweep), then render again. Rendering is
deterministic: the same records give the same page.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from kdrun.report.runs import find_results, is_failed, load_runs
from kdrun.report.tables import build_table, to_markdown, write_csv
from kdrun.results import RESULTS_FILE

RUNS_DIR = "runs"
RESUME_MATRIX = "resume_matrix.json"
TABLES_DIR = "tables"
LATENCY_PREFIX = "latency_ms_bs"
TIMED = re.compile(r"latency|speed-up")  # the table columns that time the model
SWEEP_CONFIG = "multirun.yaml"  # Hydra writes it into the sweep directory before the first job starts


def _command(record: dict[str, Any]) -> str:
    return "kdrun " + " ".join(record.get("overrides") or [])


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, (int, float)) else "–"


def _number(value: Any, digits: int = 1) -> str:
    if isinstance(value, bool) or value is None:
        return "–"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"
    return str(value)


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


NOTE_FILE = "note.md"


def load_records(measurements: Path) -> list[tuple[str, dict[str, Any]]]:
    """(name, results.json record) of every stored run, by name; its note.md, if any, as ``_note``."""
    records = []
    for path in sorted((measurements / RUNS_DIR).glob(f"*/{RESULTS_FILE}")):
        record = json.loads(path.read_text())
        note = path.parent / NOTE_FILE
        record["_note"] = " ".join(note.read_text().split()) if note.is_file() else ""
        records.append((path.parent.name, record))
    return records


def _stage_minutes(record: dict[str, Any]) -> str:
    stages = record.get("stages") or {}
    parts = [f"{name} {stage['seconds'] / 60:.1f}" for name, stage in stages.items()
             if isinstance(stage.get("seconds"), (int, float)) and stage.get("cache") != "hit"]
    return ", ".join(parts) or "–"


def runs_section(records: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = ["## Runs", "", "Dev-set scores of real runs at the scale shown, with the exact command. Minutes are per stage",
             "computed in that run (stages reused from the cache are not listed).", ""]
    rows = []
    for name, record in records:
        efficiency = record.get("efficiency") or {}
        one_class = " †" if record.get("predicts_one_class") else ""
        rows.append([
            name, f"`{_command(record)}`", record.get("main_metric", "–"), _percent(record.get("main_score")) + one_class,
            _number(efficiency.get("parameters")), record.get("precision", "–"), _stage_minutes(record), record["_note"],
        ])
    lines += _table(["run", "command", "metric", "dev", "parameters", "precision", "minutes per stage", "note"], rows)
    lines += ["", "† a constant predictor: the model gives every dev example the same class.", ""]
    return lines


def _speedup(reference_ms: Any, ms: Any) -> str:
    """How many times faster than PyTorch fp32 this format runs (its latency over this one's, as measured)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (reference_ms, ms)):
        return "–"
    return f"{reference_ms / ms:.2f}x"


def deployment_section(records: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines: list[str] = []
    for name, record in records:
        deployment = record.get("deployment") or {}
        if not deployment:
            continue
        batch_sizes = sorted({int(key.removeprefix(LATENCY_PREFIX)) for row in deployment.values() for key in row
                              if key.startswith(LATENCY_PREFIX)})
        header = (["format", "dev", "agreement with fp32", "size (MB)"] + [f"ms at batch {b}" for b in batch_sizes]
                  + [f"speed-up over fp32 at batch {b}" for b in batch_sizes])
        reference = deployment.get("fp32", {})
        rows = []
        for fmt, row in deployment.items():
            size = row.get("size_bytes", row.get("size_on_disk_bytes"))
            rows.append([fmt, _percent(row.get("main_score")), _percent(row.get("agreement_with_fp32")),
                         _number(size / 1e6 if isinstance(size, (int, float)) else None)]
                        + [_number(row.get(f"{LATENCY_PREFIX}{b}")) for b in batch_sizes]
                        + [_speedup(reference.get(f"{LATENCY_PREFIX}{b}"), row.get(f"{LATENCY_PREFIX}{b}")) for b in batch_sizes])
        lines += [f"### Deployment: {name}", "", f"`{_command(record)}`", ""] + _table(header, rows) + [""]
    return (["## Deployment", "", "Each model scored and timed per format, side by side in one process.", ""] + lines) if lines else []


def resume_section(measurements: Path) -> list[str]:
    path = measurements / RESUME_MATRIX
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    yes = lambda flag: "yes" if flag else "**no**"  # noqa: E731
    header = ["stage", "interruption", "KDRUN_FAULT", "exit code", "resumed from step", "weights bit-identical",
              "other files identical", "history and best model identical"]
    body = [[row.get("stage"), row.get("meaning"), f"`{row.get('fault')}`", row.get("interrupted_exit_code"),
             row.get("resumed_from_step"), f"{yes(row.get('weights_identical'))} ({row.get('weight_files')} files)",
             yes(row.get("other_files_identical")), yes(row.get("history_identical") and row.get("best_dev_identical"))]
            for row in data["rows"]]
    return [
        "## Kill and resume", "",
        "`python scripts/resume_matrix.py --out docs/measurements/resume_matrix.json`: each row interrupts one stage with",
        "`KDRUN_FAULT` (a real SIGKILL or SIGINT the process sends itself at that point of that step), runs the same",
        "command again, and compares the published cache entries of that stage and the stages after it with an",
        "uninterrupted run: every weight file's SHA-256, every other file (but each loop's `outcome.json`, which records",
        "wall-clock time and the step it resumed from), the training history and the kept best model. Exit code -9 is",
        "SIGKILL; 1 or -2 is the process stopping on SIGINT after it saved its state.", "",
        f"Recipe: `kdrun {' '.join(data.get('recipe', []))}`", "",
    ] + _table(header, body) + [""]


def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _flatten(child, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and len(value) > 8:
        yield prefix, f"{len(value)} values"
    else:
        yield prefix, value


def bench_section(measurements: Path) -> list[str]:
    lines = []
    for path in sorted(measurements.glob("bench_*.json")):
        data = json.loads(path.read_text())
        rows = [[f"`{key}`", _number(value, 3) if isinstance(value, float) else value] for key, value in _flatten(data)]
        lines += [f"### {path.stem}", "", f"`python scripts/{path.stem}.py` (see the script for its options)", ""]
        lines += _table(["measure", "value"], rows) + [""]
    return (["## Benchmarks", ""] + lines) if lines else []


def tables_section(measurements: Path) -> list[str]:
    """Each stored table over runs (``tables/<name>/summary.md``), its note first."""
    lines: list[str] = []
    for summary in sorted((measurements / TABLES_DIR).glob("*/summary.md")):
        note = summary.parent / "note.md"
        lines += [f"### {summary.parent.name}", ""]
        lines += [note.read_text().strip(), ""] if note.is_file() else []
        body = summary.read_text().strip().splitlines()
        lines += [line for line in body if not line.startswith("# ")] + [""]  # its own title is the heading above
    return (["## Tables over seeds", ""] + lines) if lines else []


def render(measurements: Path) -> str:
    records = load_records(measurements)
    parts = [
        "# Results", "",
        "Rendered by `python -m kdrun.report.docs` from the records in `docs/measurements/` (do not edit by hand).",
        "Machines: 2 CPU cores, no GPU. The run records ran on CPUs that multiply bf16 natively (AVX512-BF16/AMX; bf16 by",
        "default, as their precision column says); each table's note names the machine and precision it ran with. Earlier versions' numbers:",
        "[notebook.md](notebook.md).",
        "",
    ]
    parts += runs_section(records) if records else []
    parts += tables_section(measurements)
    parts += deployment_section(records)
    parts += resume_section(measurements)
    parts += bench_section(measurements)
    return "\n".join(parts).rstrip() + "\n"


def add_run(measurements: Path, run_dir: Path, name: str) -> Path:
    """Store ``run_dir``'s results.json as the record ``name``."""
    source = run_dir / RESULTS_FILE
    if not source.is_file():
        raise FileNotFoundError(f"{run_dir} holds no {RESULTS_FILE}: pass a run directory of a finished run.")
    target = measurements / RUNS_DIR / name / RESULTS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def sweep_hydra_config(sweep_dir: Path) -> dict[str, Any]:
    """The ``hydra`` node Hydra saved in the sweep's multirun.yaml: its overrides and its launcher."""
    config_file = sweep_dir / SWEEP_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{sweep_dir} holds no {SWEEP_CONFIG}: pass the directory of a `kdrun -m` sweep.")
    return yaml.safe_load(config_file.read_text()).get("hydra") or {}


def sweep_command(sweep_dir: Path) -> str:
    """The command line that started the sweep, rebuilt from the overrides Hydra saved in its multirun.yaml."""
    overrides = sweep_hydra_config(sweep_dir).get("overrides") or {}
    where = ("hydra.mode=", "hydra.sweep.dir=")  # how the sweep was started and where it wrote, not what it ran
    hydra_overrides = [o for o in overrides.get("hydra") or [] if not o.startswith(where)]
    return "kdrun " + " ".join(hydra_overrides + list(overrides.get("task") or []))


def sweep_parallel_jobs(sweep_dir: Path) -> int:
    """How many jobs the sweep's launcher ran at a time (Hydra's joblib launcher: ``n_jobs``; others: 1)."""
    launcher = sweep_hydra_config(sweep_dir).get("launcher") or {}
    jobs = launcher.get("n_jobs") if "joblib" in str(launcher.get("_target_", "")) else 1
    return jobs if isinstance(jobs, int) and jobs > 0 else (os.cpu_count() or 1)  # joblib: -1 or None = all cores


def sweep_wall_seconds(sweep_dir: Path) -> float:
    """From the sweep's start (its multirun.yaml) to its last job's results.json: the table's wall time."""
    start = (sweep_dir / SWEEP_CONFIG).stat().st_mtime
    return max(path.stat().st_mtime for path in find_results([sweep_dir])) - start


def machine_description(runs: list[dict[str, Any]]) -> str:
    """This machine (where a sweep is recorded, right after it ran) and the precision the runs trained in."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.is_file() else []
    cpu = models[0] if models else (platform.processor() or platform.machine())
    precisions = sorted({str(run["precision"]) for run in runs if run.get("precision")})
    try:
        from importlib.metadata import version

        torch = f", torch {version('torch')}"
    except Exception:  # noqa: BLE001 - the description is informative only
        torch = ""
    from kdrun.precision import cpu_native_bf16

    native, feature = cpu_native_bf16()
    bf16 = f"bf16 native ({feature})" if native else f"no native bf16 ({feature})"
    return f"{cpu}, {os.cpu_count()} cores, {bf16}{torch}; trained in {', '.join(precisions) or 'unrecorded precision'}"


def add_table(measurements: Path, sweep_dir: Path, name: str, note: str = "", wall_seconds: float | None = None) -> Path:
    """Store the table over ``sweep_dir``'s runs as ``tables/<name>``: summary.md/.csv as the sweep renders
    them, and a note.md that says how it was made (command, jobs, wall time, machine, constant predictors)
    before ``note``. A sweep with a failed job is refused: rerun its command (finished jobs are cache hits)."""
    runs = load_runs([sweep_dir])
    if not runs:
        raise FileNotFoundError(f"{sweep_dir} holds no {RESULTS_FILE}: pass the directory of a finished sweep.")
    failed = [run["_path"] for run in runs if is_failed(run)]
    if failed:
        raise ValueError(f"{len(failed)} of {len(runs)} jobs under {sweep_dir} failed ({', '.join(failed)}): "
                         "run the sweep's command again (finished jobs are cache hits), then add it.")
    command = sweep_command(sweep_dir)
    seconds = sweep_wall_seconds(sweep_dir) if wall_seconds is None else wall_seconds
    one_class = sum(bool(run.get("predicts_one_class")) for run in runs)
    constant = f"{one_class} of {len(runs)} runs predict one class (†)" if one_class else "no run is a constant predictor"
    parallel = sweep_parallel_jobs(sweep_dir)
    target = measurements / TABLES_DIR / name
    target.mkdir(parents=True, exist_ok=True)
    table = build_table(runs)
    if parallel > 1:  # jobs side by side timed each other: their latencies and speed-ups are no measurement
        table.extras = {column: values for column, values in table.extras.items() if not TIMED.search(column)}
    (target / "summary.md").write_text(to_markdown(table))
    write_csv(table, target / "summary.csv")
    at_a_time = f" ({parallel} at a time, so no latencies)" if parallel > 1 else ""
    lines = [f"`{command}`: {len(runs)} jobs{at_a_time}, {seconds / 60:.1f} min wall; {constant}.",
             f"Machine: {machine_description(runs)}."]
    (target / NOTE_FILE).write_text("\n".join(lines + ([note.strip()] if note.strip() else [])) + "\n")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measurements", type=Path, default=Path("docs/measurements"))
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--add", type=Path, help="a run directory whose results.json to store first")
    parser.add_argument("--add-table", type=Path, help="a finished sweep directory whose table to store first")
    parser.add_argument("--name", help="the record's name (with --add or --add-table)")
    parser.add_argument("--note", default="", help="what the table shows, after the generated lines of its note (with --add-table)")
    args = parser.parse_args(argv)
    if args.add:
        add_run(args.measurements, args.add, args.name or args.add.name)
    if args.add_table:
        add_table(args.measurements, args.add_table, args.name or args.add_table.name, args.note)
    args.out.write_text(render(args.measurements))
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
