"""Sweep tables: aggregate runs into rows x columns, render them, compare with the paper.

A table's rows and columns are fields of ``results.json`` (``report.rows`` /
``report.columns``, e.g. ``ablation`` x ``task``), its cells the mean (+- sample std
over repeated runs such as seeds) of ``report.metric``. A failed run (``status:
failed``) is never averaged: its cell reads ``failed`` (or ``(n failed)`` after the
mean of the runs that finished) and its error is listed below the table. When ``report.reference``
names a YAML file of published numbers (``kdrun/report/references/<name>.yaml`` or a
path), each cell gets the published value and the difference beside it. Every
table is printed with rich and written as ``summary.csv``, ``summary.md`` and
``summary.tex``; score-vs-size and score-vs-latency Pareto plots and training
curves go beside them.

    python -m kdrun.report DIR [DIR ...] [--rows ablation] [--columns task] [--reference tinybert_table3] [--out DIR]
        [--latency-format onnx_int8 --latency-batch-size 32]

Each DIR is a sweep directory, a run directory, or any tree holding them.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kdrun.report.runs import ReportError, field_value, is_failed, load_reference, load_runs, one_line

DEFAULT_SETTINGS = {
    "rows": "ablation", "columns": "task", "metric": "main_score", "scale": 100.0, "reference": None, "relative_to": None,
    "latency_format": None, "latency_batch_size": 1,
}
# Per-row measures shown after the score columns when the runs report them (mean over the row's runs).
# The first field a run has is used: an unquantized model's size is its fp32 safetensors file.
EFFICIENCY_FIELDS = {
    "params (M)": (("efficiency.parameters",), 1e-6),
    "size (MB)": (("efficiency.quantization.packed_bytes", "efficiency.size_on_disk_bytes"), 1e-6),
    "compression": (("efficiency.quantization.compression",), 1.0),
    "latency bs1 (ms)": (("efficiency.latency_ms_bs1",), 1.0),
    "bf16 speed-up bs32": (("deployment.bf16.speedup_vs_fp32_bs32",), 1.0),
    "int8 speed-up bs1": (("deployment.int8.speedup_vs_fp32_bs1",), 1.0),
    "int8 speed-up bs32": (("deployment.int8.speedup_vs_fp32_bs32",), 1.0),
    "onnx int8 speed-up bs1": (("deployment.onnx_int8.speedup_vs_fp32_bs1",), 1.0),
    "onnx int8 speed-up bs32": (("deployment.onnx_int8.speedup_vs_fp32_bs32",), 1.0),
}
LATENCY_COLUMN = "latency bs1 (ms)"


def efficiency_fields(settings: dict[str, Any]) -> dict[str, tuple[tuple[str, ...], float]]:
    """EFFICIENCY_FIELDS with the latency (and size) of ``settings['latency_format']`` when one is chosen: any
    deployment format's (``deployment.<format>.latency_ms_bs<N>``), e.g. onnx_int8 at batch 32. The Pareto
    plots draw the same columns."""
    fields = dict(EFFICIENCY_FIELDS)
    chosen, batch_size = settings.get("latency_format"), int(settings.get("latency_batch_size") or 1)
    if chosen:
        fields[LATENCY_COLUMN] = ((f"deployment.{chosen}.latency_ms_bs{batch_size}",), 1.0)
        fields["size (MB)"] = ((f"deployment.{chosen}.size_bytes", *fields["size (MB)"][0]), 1e-6)
    elif batch_size != 1:
        fields[LATENCY_COLUMN] = ((f"efficiency.latency_ms_bs{batch_size}",), 1.0)
    return {latency_column(settings) if name == LATENCY_COLUMN else name: value for name, value in fields.items()}


def latency_column(settings: dict[str, Any]) -> str:
    chosen, batch_size = settings.get("latency_format"), int(settings.get("latency_batch_size") or 1)
    return f"latency bs{batch_size} (ms{', ' + chosen if chosen else ''})"


ONE_CLASS_MARK = "†"
ONE_CLASS_NOTE = f"{ONE_CLASS_MARK} a run whose model gives every example of a dev split the same class (a constant predictor)"
FAILED_TEXT = "failed"
FAILED_NOTE = f"{FAILED_TEXT}: a run of the cell stopped with an error; it has no score and is not in the mean"


@dataclass(frozen=True)
class Failure:
    """A failed run: its cell, its run directory and its error, listed below the table."""

    row: str
    column: str
    path: str
    error: str

    def line(self) -> str:
        """One line, whatever the error's own line breaks."""
        return f"{FAILED_TEXT}: {self.row} / {self.column} ({self.path}): {one_line(self.error)}"


@dataclass
class Cell:
    values: list[float]
    published: float | None = None
    one_class_runs: int = 0  # how many of ``values`` come from a constant predictor (see ONE_CLASS_NOTE)
    failed_runs: int = 0  # runs of this cell that stopped with an error (not in ``values``)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def difference(self) -> float | None:
        return None if self.mean is None or self.published is None else self.mean - self.published

    def text(self) -> str:
        if self.mean is None:
            return FAILED_TEXT if self.failed_runs else "-"
        text = f"{self.mean:.2f} ± {self.std:.2f}" if self.std is not None else f"{self.mean:.2f}"
        text = f"{text} {ONE_CLASS_MARK}" if self.one_class_runs else text
        return f"{text} ({self.failed_runs} {FAILED_TEXT})" if self.failed_runs else text


@dataclass
class SweepTable:
    title: str
    row_field: str
    column_field: str
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], Cell]
    extras: dict[str, dict[str, float]] = field(default_factory=dict)  # measure -> row -> value
    reference: dict[str, Any] | None = None
    failures: list[Failure] = field(default_factory=list)

    @property
    def notes(self) -> list[str]:
        """What the marks in the cells mean; a table of constant predictors or failed runs must say so."""
        notes = [ONE_CLASS_NOTE] if any(cell.one_class_runs for cell in self.cells.values()) else []
        return notes + ([FAILED_NOTE] if self.failures else [])

    @property
    def footer(self) -> list[str]:
        """Everything printed below the table: the notes, then each failed run's error."""
        return self.notes + [failure.line() for failure in self.failures]

    @property
    def has_reference(self) -> bool:
        return any(cell.published is not None for cell in self.cells.values())

    def header(self) -> list[str]:
        names = [self.row_field]
        for column in self.columns:
            names.append(column)
            if self.has_reference:
                names += [f"{column} (paper)", f"{column} Δ"]
        return names + list(self.extras)

    def body(self, number: str = "{:.2f}") -> list[list[str]]:
        lines = []
        for row in self.rows:
            line = [row]
            for column in self.columns:
                cell = self.cells.get((row, column), Cell([]))
                line.append(cell.text())
                if self.has_reference:
                    line.append("-" if cell.published is None else number.format(cell.published))
                    line.append("-" if cell.difference is None else f"{cell.difference:+.2f}")
            for values in self.extras.values():
                value = values.get(row)
                line.append("-" if value is None else f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}")
            lines.append(line)
        return lines


def report_settings(runs: Sequence[dict[str, Any]], settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults, then what the runs' experiment set (``report`` in results.json), then explicit settings."""
    explicit = {k: v for k, v in (settings or {}).items() if v is not None}
    return {**DEFAULT_SETTINGS, **(runs[0].get("report") or {}), **explicit}


def build_table(runs: Sequence[dict[str, Any]], settings: dict[str, Any] | None = None, title: str = "") -> SweepTable:
    """Aggregate runs into one table; ``settings`` overrides what the runs' own ``report`` says."""
    if not runs:
        raise ReportError("no results.json found: run the sweep first, or point at the directory that holds it.")
    chosen = report_settings(runs, settings)
    row_field, column_field, metric, scale = chosen["rows"], chosen["columns"], chosen["metric"], float(chosen["scale"])
    rows: list[str] = []
    columns: list[str] = []
    grouped: dict[tuple[str, str], list[float]] = {}
    one_class: dict[tuple[str, str], int] = {}
    per_row: dict[str, list[dict[str, Any]]] = {}
    failures: list[Failure] = []
    for run in runs:
        row, column = str(field_value(run, row_field)), str(field_value(run, column_field))
        failed, value = is_failed(run), field_value(run, metric)
        if value is None and not failed:  # a run that does not report the metric
            continue
        rows += [row] if row not in rows else []
        columns += [column] if column not in columns else []
        if failed:  # shown and listed, never averaged
            failures.append(Failure(row, column, str(run.get("_path", "?")), str(run.get("error") or "no error message recorded")))
            continue
        grouped.setdefault((row, column), []).append(float(value) * scale)
        one_class[(row, column)] = one_class.get((row, column), 0) + bool(run.get("predicts_one_class"))
        per_row.setdefault(row, []).append(run)
    if chosen["relative_to"]:
        grouped = _relative(grouped, str(chosen["relative_to"]), columns)
    reference = load_reference(chosen["reference"])
    cells = {key: Cell(values, _published(reference, *key), one_class[key]) for key, values in grouped.items()}
    for failure in failures:
        key = (failure.row, failure.column)
        cells.setdefault(key, Cell([], _published(reference, *key))).failed_runs += 1
    extras: dict[str, dict[str, float]] = {}
    for name, (paths, factor) in efficiency_fields(chosen).items():
        measured = {row: [v * factor for v in (_first_field(r, paths) for r in members) if v is not None] for row, members in per_row.items()}
        values = {row: statistics.fmean(found) for row, found in measured.items() if found}
        if values:
            extras[name] = values
    experiments = list(dict.fromkeys(str(run.get("experiment", "")) for run in runs))
    experiment = experiments[0] if len(experiments) == 1 else " + ".join(experiments)
    heading = title or f"{experiment}: {metric} ({'x100, ' if scale == 100 else ''}mean ± std over runs)"
    if reference:
        heading += f" vs {reference.get('source', chosen['reference'])} [{reference.get('split', '?')}]"
    return SweepTable(heading, row_field, column_field, rows, columns, cells, extras, reference, failures)


def _relative(grouped: dict[tuple[str, str], list[float]], base_row: str, columns: list[str]) -> dict[tuple[str, str], list[float]]:
    """Every cell minus the mean of ``base_row`` in its column (e.g. DistilBERT's ablation deltas)."""
    bases = {c: statistics.fmean(grouped[(base_row, c)]) for c in columns if (base_row, c) in grouped}
    if not bases:
        raise ReportError(f"report.relative_to={base_row} but no run has that row.")
    return {(r, c): [v - bases[c] for v in values] for (r, c), values in grouped.items() if c in bases}


def _first_field(run: dict[str, Any], paths: Sequence[str]) -> float | None:
    for path in paths:
        value = field_value(run, path)
        if value is not None:
            return float(value)
    return None


def _published(reference: dict[str, Any] | None, row: str, column: str) -> float | None:
    if not reference:
        return None
    rows = reference.get("rows") or {}
    # A row kdrun names otherwise than the paper (the recipe `tinybert`, whose default student is the paper's
    # `tinybert4`; DistilBERT's `teacher`, printed as `bert_base`): the reference's aliases map ours to its.
    values = rows.get(row) or rows.get((reference.get("aliases") or {}).get(row, row)) or {}
    # A run's column is a task (mnli); a paper may print several numbers for it (MNLI-m/mm):
    # task_columns names the one the task's main metric is compared with.
    key = reference.get("compare_column") or (reference.get("task_columns") or {}).get(column, column)
    value = values.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# --- rendering --------------------------------------------------------------------------


def print_table(table: SweepTable, console: Console | None = None) -> None:
    """The table with its notes as caption, then one line per failed run (too long for a caption)."""
    rich_table = Table(title=table.title, caption="\n".join(table.notes) or None)
    for index, name in enumerate(table.header()):
        rich_table.add_column(name, justify="left" if index == 0 else "right")
    for line in table.body():
        rich_table.add_row(*line)
    console = console or wide_console()
    console.print(rich_table)
    for failure in table.failures:
        console.print(failure.line(), markup=False, highlight=False)


def wide_console() -> Console:
    """A terminal's own width; in a log file (rich assumes 80 columns) room for the whole table, whose
    row names and column headers would otherwise be cut to a few letters."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def to_markdown(table: SweepTable) -> str:
    header = table.header()
    lines = [f"**{table.title}**", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in table.body()]
    if table.footer:  # one paragraph per note and per failed run
        lines += ["", "\n\n".join(table.footer)]
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(char, escaped)
    return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace(ONE_CLASS_MARK, r"$\dagger$")


def to_latex(table: SweepTable) -> str:
    """The table with its notes as caption; failed runs' errors stay in summary.md (long, and not TeX)."""
    header = table.header()
    lines = [
        r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
        " & ".join(_latex_escape(h) for h in header) + r" \\", r"\midrule",
    ]
    lines += [" & ".join(_latex_escape(c) for c in line) + r" \\" for line in table.body()]
    caption = " ".join([table.title, *(f"{note}." for note in table.notes)])
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + _latex_escape(caption) + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_csv(table: SweepTable, path: Path) -> None:
    """Long format: one line per cell, machine-readable (mean, std, n, published, difference)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([table.row_field, table.column_field, "mean", "std", "n", "published", "difference", "one_class_runs", "failed_runs"])
        for row in table.rows:
            for column in table.columns:
                cell = table.cells.get((row, column))
                if cell is None:
                    continue
                writer.writerow(
                    [row, column, _number(cell.mean), _number(cell.std), len(cell.values), _number(cell.published), _number(cell.difference), cell.one_class_runs,
                     cell.failed_runs]
                )


def _number(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.4f}"


def write_report(runs: Sequence[dict[str, Any]], out_dir: Path, settings: dict[str, Any] | None = None, console: Console | None = None) -> dict[str, Path]:
    """Print the table and write summary.{csv,md,tex}, Pareto plots and training curves into ``out_dir``."""
    from kdrun.report.plots import plot_pareto, plot_training_curves

    table = build_table(runs, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    print_table(table, console)
    written = {"csv": out_dir / "summary.csv", "md": out_dir / "summary.md", "tex": out_dir / "summary.tex"}
    write_csv(table, written["csv"])
    written["md"].write_text(to_markdown(table))
    written["tex"].write_text(to_latex(table))
    chosen = report_settings(runs, settings)
    metric = chosen["metric"]
    for name, x_name in {"parameters": "params (M)", "size": "size (MB)", "latency": latency_column(chosen)}.items():
        points = _pareto_points(table, x_name)
        if len(points) >= 2:
            paths = plot_pareto(points, x_name, f"{metric} (x100)", out_dir / f"pareto_{name}", title=table.title.split(":")[0])
            written[f"pareto_{name}"] = paths[0]
    for run in runs:
        histories = training_histories(run)
        if histories:
            label = "_".join(str(field_value(run, f)) for f in (table.row_field, table.column_field))
            plot_training_curves(histories, out_dir / "curves" / label, title=label)
    return written


def training_histories(run: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each trained step's logged history, by stage; a stage that trains in steps (task distillation's
    intermediate and prediction steps) keeps one history per step, and those are where ablation rows differ."""
    histories: dict[str, list[dict[str, Any]]] = {}
    for stage, output in (run.get("stages") or {}).items():
        summary = output.get("summary") or {}
        if summary.get("history"):
            histories[stage] = summary["history"]
        for step, part in summary.items():
            if isinstance(part, dict) and part.get("history"):
                histories[f"{stage} {step}"] = part["history"]
    return histories


def _pareto_points(table: SweepTable, x_name: str) -> list[tuple[str, float, float]]:
    """(row label, x, score) per row, for the first column (a sweep over models of one task); rows whose cell
    has no score (all its runs failed) are left out."""
    if x_name not in table.extras or not table.columns:
        return []
    column = table.columns[0]
    scores = {row: table.cells[(row, column)].mean for row in table.rows if (row, column) in table.cells}
    return [(row, table.extras[x_name][row], score) for row, score in scores.items() if row in table.extras[x_name] and score is not None]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdrun.report", description="Render kdrun runs as a table.")
    parser.add_argument("paths", nargs="+", type=Path, help="sweep or run directories (searched for results.json)")
    parser.add_argument("--rows", help="results.json field for rows (default: the runs' report.rows, else ablation)")
    parser.add_argument("--columns", help="results.json field for columns (default: task)")
    parser.add_argument("--metric", help="results.json field for cells (default: main_score)")
    parser.add_argument("--scale", type=float, help="multiply cells by this (default 100: fractions to percent)")
    parser.add_argument("--reference", help="published numbers: a name in kdrun/report/references or a YAML path")
    parser.add_argument("--relative-to", help="show every cell minus this row's value in its column")
    parser.add_argument("--out", type=Path, help="where to write summary.* (default: the first path)")
    parser.add_argument("--latency-format", help="the latency column and Pareto plot of this deployment format (fp32, int8, onnx, onnx_int8, ...)")
    parser.add_argument("--latency-batch-size", type=int, help="... at this batch size (default 1)")
    args = parser.parse_args(argv)
    settings = {"rows": args.rows, "columns": args.columns, "metric": args.metric, "scale": args.scale,
                "reference": args.reference, "relative_to": args.relative_to, "latency_format": args.latency_format,
                "latency_batch_size": args.latency_batch_size}
    try:
        runs = load_runs(args.paths)
        written = write_report(runs, args.out or args.paths[0], settings)
    except ReportError as error:
        raise SystemExit(f"kdrun.report: {error}") from None
    failed = sum(is_failed(run) for run in runs)
    Console().print(f"{len(runs)} runs{f' ({failed} failed)' if failed else ''}; wrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()
